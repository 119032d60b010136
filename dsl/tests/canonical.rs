//! The canonical form of every built-in rule: class, gate, low rank, writes and output read.

use chunkc_dsl::ast::Ty;
use chunkc_dsl::canon::{canonicalize, print_expr, Class, KeyGate, Read};
use std::path::PathBuf;

fn rule(name: &str) -> chunkc_dsl::ast::Rule {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../rules").join(format!("{name}.toml"));
    chunkc_dsl::load_rule(&path).unwrap_or_else(|d| panic!("{d}"))
}

#[test]
fn classes_of_the_builtin_rules() {
    let expect = [
        ("linear_attn", Class::Additive),
        ("retention", Class::Decayed),
        ("simple_gla", Class::GatedScalar),
        ("mamba2", Class::GatedScalar),
        ("gla", Class::GatedVector),
        ("hgrn2", Class::GatedVector),
        ("rwkv6", Class::GatedVector),
        ("delta_rule", Class::Delta { rank: 1, vector_gate: false }),
        ("gated_delta_rule", Class::Delta { rank: 1, vector_gate: false }),
        ("kda", Class::Delta { rank: 1, vector_gate: true }),
        ("dplr", Class::Delta { rank: 1, vector_gate: true }),
    ];
    for (name, class) in expect {
        let r = rule(name);
        let c = canonicalize(&r).unwrap_or_else(|e| panic!("{name}: {}", e.reason));
        assert_eq!(c.class, class, "{name}");
    }
}

#[test]
fn gated_delta_rule_canonical_terms() {
    let r = rule("gated_delta_rule");
    let c = canonicalize(&r).expect("chunkable");
    let p = |e| print_expr(&r, e);
    assert_eq!(p(c.log_gate.as_ref().expect("gate")), "g");
    assert_eq!(c.low_rank.len(), 1);
    let (a, b) = &c.low_rank[0];
    // (I - beta k k^T) applied after the decay: a b^T = k (-(e^g k) beta)^T.
    assert_eq!((p(a), p(b)), ("k".to_string(), "-(exp(g) * k) * beta".to_string()));
    assert_eq!(c.writes.len(), 1);
    assert_eq!((p(&c.writes[0].0), p(&c.writes[0].1)), ("k".to_string(), "v * beta".to_string()));
    assert_eq!(c.output.read, Read::After);
    assert_eq!(p(&c.output.query), "q * scale");
    assert!(c.output.coef.is_none() && c.output.extra.is_none());
}

#[test]
fn rwkv6_reads_before_with_a_bonus_and_mamba2_has_a_skip() {
    let r = rule("rwkv6");
    let c = canonicalize(&r).expect("chunkable");
    assert_eq!(c.output.read, Read::Before);
    assert_eq!(print_expr(&r, c.output.extra.as_ref().expect("bonus")), "v * dot(u * k, q) * scale");
    assert_eq!(c.log_gate.as_ref().expect("gate").ty, Ty::VecK);

    let r = rule("mamba2");
    let c = canonicalize(&r).expect("chunkable");
    assert_eq!(c.output.read, Read::After);
    assert_eq!(print_expr(&r, c.log_gate.as_ref().expect("gate")), "softplus(dt) * A");
    assert_eq!(print_expr(&r, c.output.extra.as_ref().expect("skip")), "D * x");
    assert_eq!(print_expr(&r, &c.writes[0].1), "softplus(dt) * x");
}

/// The `[inputs]` lines of those of `inputs` (name, shape) that `step` reads (an unused
/// input is an error of its own).
fn declared(step: &str, inputs: &[(&str, &str)]) -> String {
    let words: Vec<&str> = step.split(|c: char| !c.is_ascii_alphanumeric()).collect();
    inputs
        .iter()
        .filter(|(n, _)| words.contains(n))
        .map(|(n, t)| format!("{n} = \"{t}\""))
        .collect::<Vec<_>>()
        .join("\n")
}

fn parse(step: &str, inputs: &str) -> chunkc_dsl::ast::Rule {
    let src = format!("name = \"t\"\nstep = \"\"\"\n{step}\n\"\"\"\n\n[inputs]\n{inputs}\n");
    chunkc_dsl::parse_rule("t.toml", &src).unwrap_or_else(|d| panic!("{d}"))
}

#[test]
fn reasons_for_not_chunking() {
    let io = "q = \"[K]\"\nk = \"[K]\"\nv = \"[V]\"\ngv = \"[V]\"";
    let cases = [
        ("S = S * S + outer(k, v + gv)\no = S^T @ q", "product of two values that both depend on the state"),
        ("S = exp(S) + outer(k, v + gv)\no = S^T @ q", "exp(...) of a value that depends on the state"),
        ("S = S + outer(k, v + gv)\no = S^T @ q / sum(S @ v)", "S @ y gives a [K] vector"),
        ("S = outer(k, v + gv)\no = S^T @ q", "discards the previous state"),
        ("o = S^T @ q\nS = S + outer(k, v) + outer(k, gv * (S^T @ q))", "scaled by different [V] vectors"),
        ("S = outer(k * k, gv) * S + outer(k, v)\no = S^T @ q", "gates each entry of the state by a [K, V] matrix"),
        ("S = S * outer(k, gv) + outer(k, v)\no = S^T @ q", "gates each entry of the state by a [K, V] matrix"),
        ("S = max(S, 0) + outer(k, v + gv)\no = S^T @ q", "max(...) of a value that depends on the state"),
        ("S = relu(S) + outer(k, v + gv)\no = S^T @ q", "max(...) of a value that depends on the state"),
        ("S = tanh(S) + outer(k, v + gv)\no = S^T @ q", "tanh(...) of a value that depends on the state"),
        ("S = (S > 0) * S + outer(k, v + gv)\no = S^T @ q", "the comparison `>` of a value that depends on the state"),
        ("S = where(S > 0, S, 2 * S) + outer(k, v + gv)\no = S^T @ q", "the comparison `>`"),
        ("S = where(S, S, 0) + outer(k, v + gv)\no = S^T @ q", "a `where` whose condition depends on the state"),
        ("S = S + outer(k, v + gv)\no = (S^T @ q) * (S^T @ k)", "two different vectors (`q` and `k`)"),
        ("S = S + outer(k, v + gv)\no = (S^T @ q) / max(abs(dot(q, S @ v)), 1)", "S @ y gives a [K] vector"),
        ("S = S + outer(k, v + gv)\no = tanh(S^T @ q) + S^T @ k", "two different vectors (`q` and `k`)"),
        (
            "y = S^T @ q\nS = S + outer(k, v + gv)\no = tanh(y) + S^T @ q",
            "one state before its update and another after",
        ),
    ];
    for (step, why) in cases {
        let r = parse(step, io);
        let e = canonicalize(&r).expect_err(step);
        assert!(e.reason.contains(why), "{step}: got `{}`", e.reason);
        assert!(e.span.end <= r.source.len() && e.span.start < e.span.end, "{step}: span {:?}", e.span);
    }
}

/// A state-free term inside a write is a write, however the sum is ordered; so is a
/// constant added to the state (writes that share a key or a value merge).
#[test]
fn affine_terms_are_writes_in_any_order() {
    let io = "q = \"[K]\"\nk = \"[K]\"\nv = \"[V]\"\nbeta = \"scalar\"";
    let orders = [
        "S = S + outer(k, beta * (v - S^T @ k + 1))",
        "S = S + outer(k, beta * (v + 1 - S^T @ k))",
        "S = S + outer(k, beta * (1 - S^T @ k + v))",
        "S = outer(k, beta * (-(S^T @ k) + v + 1)) + S",
        "S = outer(k, beta * (1 + (v - k @ S))) + S",
    ];
    for step in orders {
        let r = parse(&format!("{step}\no = S^T @ q"), io);
        let c = canonicalize(&r).unwrap_or_else(|e| panic!("{step}: {}", e.reason));
        assert_eq!(c.class, Class::Delta { rank: 1, vector_gate: false }, "{step}");
        assert_eq!(c.writes.len(), 1, "{step}");
        assert_eq!(c.writes[0].1.ty, Ty::VecV, "{step}: the write's value is a [V] vector");
    }
    for (step, writes) in [
        ("S = S + 1 + outer(k, v)", 2),
        ("S = exp(-beta * beta) * (S + 0.5 * beta) + outer(k, v)", 2),
        ("S = S + k + outer(k, v)", 1),
        ("S = v + S - outer(k, v)", 1),
    ] {
        let r = parse(
            &format!("{step}\no = S^T @ q + 1"),
            io.replace("\nbeta = \"scalar\"", if step.contains("beta") { "\nbeta = \"scalar\"" } else { "" }).as_str(),
        );
        let c = canonicalize(&r).unwrap_or_else(|e| panic!("{step}: {}", e.reason));
        assert_eq!(c.writes.len(), writes, "{step}");
        for (kw, vw) in &c.writes {
            assert_eq!((kw.ty, vw.ty), (Ty::VecK, Ty::VecV), "{step}");
        }
        assert_eq!(c.output.extra.as_ref().map(|e| e.ty), Some(Ty::VecV), "{step}: o's constant is a [V] term");
    }
}

/// A `[V]` gate scales the state's columns: the value side, alone or with a key-side gate.
#[test]
fn value_side_and_two_sided_gates() {
    let io = "q = \"[K]\"\nk = \"[K]\"\nv = \"[V]\"\ngv = \"[V]\"\ngk = \"[K]\"";
    let cases = [
        ("S = exp(gv) * S + outer(k, v)", Class::GatedValue { key_gate: KeyGate::None }, None),
        ("S = exp(gk) * S * exp(gv) + outer(k, v)", Class::GatedValue { key_gate: KeyGate::Vector }, Some(Ty::VecK)),
        ("S = exp(gv) * (exp(gk) * S + outer(k, v))", Class::GatedValue { key_gate: KeyGate::Vector }, Some(Ty::VecK)),
    ];
    for (step, class, key_gate) in cases {
        let io = if step.contains("gk") { io.to_string() } else { io.replace("\ngk = \"[K]\"", "") };
        let r = parse(&format!("{step}\no = S^T @ q"), &io);
        let c = canonicalize(&r).unwrap_or_else(|e| panic!("{step}: {}", e.reason));
        assert_eq!(c.class, class, "{step}");
        assert_eq!(print_expr(&r, c.log_vgate.as_ref().expect("a value-side gate")), "gv", "{step}");
        assert_eq!(c.log_gate.as_ref().map(|g| g.ty), key_gate, "{step}");
    }
}

/// Two Householder steps per token (DeltaProduct) expand to three low-rank terms, two of
/// which share their `a`: rank 2, and the writes of the same key merge too.
#[test]
fn deltaproduct_has_rank_two() {
    let io = "q = \"[K]\"\nk = \"[K]\"\nk2 = \"[K]\"\nv = \"[V]\"\nv2 = \"[V]\"\nb = \"scalar\"\nb2 = \"scalar\"";
    let r = parse(
        "S = S - outer(k, b * (k @ S)) + outer(k, b * v)\nS = S - outer(k2, b2 * (k2 @ S)) + outer(k2, b2 * v2)\no = S^T @ q",
        io,
    );
    let c = canonicalize(&r).expect("linear");
    assert_eq!(c.class, Class::Delta { rank: 2, vector_gate: false });
    assert_eq!(c.writes.len(), 2, "{}", c.describe(&r));
}

/// A `where` with a state-free condition masks the value it keeps: a 0/1 factor, linear.
#[test]
fn a_where_on_the_state_with_a_free_condition_is_linear() {
    let io = "q = \"[K]\"\nk = \"[K]\"\nv = \"[V]\"\nb = \"scalar\"";
    let r = parse("S = S + outer(k, v)\no = where(b > 0, S^T @ q, 2 * v)", io);
    let c = canonicalize(&r).expect("chunkable");
    // The scalar mask is folded into the query.
    assert_eq!(print_expr(&r, &c.output.query), "q * where(b > 0, 1, 0)");
    assert_eq!(print_expr(&r, c.output.extra.as_ref().expect("the other branch")), "where((b > 0) == 0, 2 * v, 0)");
}

#[test]
fn a_decay_that_is_not_provably_positive_warns() {
    let r =
        parse("S = (1 - g) * S + outer(k, v)\no = S^T @ q", "q = \"[K]\"\nk = \"[K]\"\nv = \"[V]\"\ng = \"scalar\"");
    let c = canonicalize(&r).expect("chunkable");
    assert_eq!(c.warnings.len(), 1);
    assert!(c.warnings[0].1.contains("not provably positive"), "{}", c.warnings[0].1);
    let r =
        parse("S = sigmoid(g) * S + outer(k, v)\no = S^T @ q", "q = \"[K]\"\nk = \"[K]\"\nv = \"[V]\"\ng = \"scalar\"");
    let c = canonicalize(&r).expect("chunkable");
    assert!(c.warnings.is_empty());
    assert_eq!(print_expr(&r, c.log_gate.as_ref().expect("gate")), "-softplus(-g)");
}

#[test]
fn the_decay_factor_of_a_low_rank_b_is_found_only_where_it_is_one() {
    let shown = |name: &str| {
        let r = rule(name);
        let c = canonicalize(&r).expect("chunkable");
        assert_eq!(c.low_rank_decayed.len(), c.low_rank.len(), "{name}");
        c.low_rank_decayed.iter().map(|b| b.as_ref().map(|b| print_expr(&r, b))).collect::<Vec<_>>()
    };
    // b = -(e^g k) beta: the decay is a factor, b' = -k beta.
    assert_eq!(shown("gated_delta_rule"), [Some("-k * beta".to_string())]);
    assert_eq!(shown("kda"), [Some("-k * beta".to_string())]);
    // RWKV-7's alpha reads the state before the decay: no factor.
    assert_eq!(shown("dplr"), [None]);
    assert!(shown("gla").is_empty());
    // The factor is found in either operand of a product: here b = -(e^gk (e^gk beta)).
    let io = "q = \"[K]\"\nk = \"[K]\"\nv = \"[V]\"\ngk = \"[K]\"\nbeta = \"scalar\"";
    let r = parse("S = exp(gk) * S\nS = S + outer(k, v - S^T @ (exp(gk) * beta))\no = S^T @ q", io);
    let c = canonicalize(&r).expect("chunkable");
    assert_eq!(c.low_rank.len(), 1);
    let decayed = c.low_rank_decayed[0].as_ref().map(|b| print_expr(&r, b));
    assert_eq!(decayed.as_deref(), Some("-(exp(gk) * beta)"), "b = {}", print_expr(&r, &c.low_rank[0].1));
}

#[test]
fn a_factor_that_would_change_the_type_is_not_taken_out() {
    use chunkc_dsl::ast::{BinaryOp, Expr, ExprKind, Span, UnaryOp};
    use chunkc_dsl::canon::without_factor;
    let sp = Span::default();
    let leaf = |i, ty| Expr::new(ExprKind::Input(i), ty, sp);
    let w = Expr::new(ExprKind::Unary(UnaryOp::Exp, Box::new(leaf(0, Ty::VecK))), Ty::VecK, sp);
    let prod = |x: &Expr, y: &Expr, ty| {
        Expr::new(ExprKind::Binary(BinaryOp::Mul, Box::new(x.clone()), Box::new(y.clone())), ty, sp)
    };
    // w * beta ([K] * scalar): taking w out would leave a scalar.
    assert_eq!(without_factor(&prod(&w, &leaf(1, Ty::Scalar), Ty::VecK), &w), None);
    // (w * k) / beta: the numerator's factor is taken out.
    let k = leaf(2, Ty::VecK);
    let div = Expr::new(
        ExprKind::Binary(BinaryOp::Div, Box::new(prod(&w, &k, Ty::VecK)), Box::new(leaf(1, Ty::Scalar))),
        Ty::VecK,
        sp,
    );
    let got = without_factor(&div, &w).expect("a factor of the numerator");
    assert!(matches!(&got.kind, ExprKind::Binary(BinaryOp::Div, x, _) if x.kind == k.kind));
    // Not a factor of a sum.
    let sum = Expr::new(ExprKind::Binary(BinaryOp::Add, Box::new(w.clone()), Box::new(k.clone())), Ty::VecK, sp);
    assert_eq!(without_factor(&sum, &w), None);
}

/// Every reason a rule linear-looking or not gets no canonical form, each with a rule that
/// reaches it; the reason must say what breaks the form and point at the expression that
/// does (the span's text).
#[test]
fn every_refusal_states_its_reason_at_its_expression() {
    let io = |step: &str| declared(step, &[("q", "[K]"), ("k", "[K]"), ("v", "[V]"), ("gv", "[V]"), ("gw", "[V]")]);
    let cases: &[(&str, &str, &str)] = &[
        ("S = outer(k, v + gv + gw)\no = S^T @ q", "discards the previous state", "S = outer(k, v + gv + gw)"),
        ("S = S + outer(k, v + gv + gw)\no = v", "the output never reads the state", "o = v"),
        ("S = outer(k, k @ S) + outer(k, v + gv + gw)\no = S^T @ q", "has no diagonal part", ""),
        (
            "S = S + outer(k, (v + gv + gw) * sum(S^T @ q))\no = S^T @ q",
            "a sum or norm of a value that depends on the state",
            "sum(S^T @ q)",
        ),
        (
            "S = S + outer(k, v) * outer(k, gv + gw)\no = S^T @ q",
            "an elementwise product of two matrices",
            "outer(k, v) * outer(k, gv + gw)",
        ),
        (
            "S = S + outer(k, v)\no = (S^T @ q) * (S^T @ k) + gv + gw",
            "the output reads the states through two different vectors (`q` and `k`)",
            "(S^T @ k)",
        ),
        (
            "S = S + outer(k, (v + gv + gw) / (S^T @ q))\no = S^T @ q",
            "dividing by a value that depends on the state",
            "(v + gv + gw) / (S^T @ q)",
        ),
        (
            "S = S + outer(k, pow(S^T @ q, 2) + gv + gw)\no = S^T @ q",
            "pow(...) of a value that depends on the state",
            "pow(S^T @ q, 2)",
        ),
        (
            "S = S + outer(k, exp(S^T @ q) + gv + gw)\no = S^T @ q",
            "exp(...) of a value that depends on the state",
            "exp(S^T @ q)",
        ),
        ("S = S + outer(k, v)\no = gv * (S^T @ q) + gw * (S^T @ k)", "two different [V] scalings", ""),
        (
            "P = S\nS = S + outer(k, v + gv + gw)\no = (S + P)^T @ q",
            "mixes the state before and after the update",
            "(S + P)",
        ),
        (
            "S = S * exp(gv) + S * exp(gw) + outer(k, v)\no = S^T @ q",
            "adds two state terms scaled by different [V] vectors",
            "",
        ),
        (
            "y = S^T @ q\nS = S + outer(k, v + gv + gw)\no = y + S^T @ q",
            "the output reads one state before its update and another after",
            "S^T @ q",
        ),
        (
            "S = S + outer(k, v + gv + gw)\no = (S + outer(k, S^T @ q))^T @ q",
            "writes a term read from the state after its last update",
            "outer(k, S^T @ q)",
        ),
        (
            "S = S + outer(k, gv * (S^T @ q) + gw * (S^T @ k)) + outer(k, v)\no = S^T @ q",
            "writes state reads scaled by different [V] vectors",
            "outer(k, gv * (S^T @ q) + gw * (S^T @ k))",
        ),
        (
            "S = S + outer(k, v * dot(S^T @ q, v + gv + gw))\no = S^T @ q",
            "a dot product with a state read gives a scalar",
            "dot(S^T @ q, v + gv + gw)",
        ),
        ("S = S + outer(k, v)\no = S @ (v + gv + gw) @ S", "S @ y gives a [K] vector", "S @ (v + gv + gw)"),
        (
            "S = S * S + outer(k, v + gv + gw)\no = S^T @ q",
            "a product of two values that both depend on the state",
            "S * S",
        ),
        (
            "S = outer(k * k, gv + gw) * S + outer(k, v)\no = S^T @ q",
            "gates each entry of the state by a [K, V] matrix",
            "outer(k * k, gv + gw) * S",
        ),
        (
            "S = S + outer(k, max(S^T @ q, gv + gw))\no = S^T @ q",
            "max(...) of a value that depends on the state",
            "max(S^T @ q, gv + gw)",
        ),
        (
            "S = S + outer(k, (S^T @ q > 0) * (gv + gw)) + outer(k, v)\no = S^T @ q",
            "the comparison `>` of a value that depends on the state",
            "(S^T @ q > 0)",
        ),
        (
            "y = S^T @ q\nS = S + outer(k, where(y, gv, gw)) + outer(k, v)\no = S^T @ q",
            "a `where` whose condition depends on the state",
            "",
        ),
    ];
    let mut failures = vec![];
    for (step, why, at) in cases {
        let r = parse(step, &io(step));
        let e = match canonicalize(&r) {
            Ok(c) => {
                failures.push(format!("{step}: chunkable, as {:?}", c.class));
                continue;
            }
            Err(e) => e,
        };
        let text = r.source.get(e.span.start..e.span.end).unwrap_or("");
        if !e.reason.contains(why) || (!at.is_empty() && text != *at) || text.is_empty() {
            failures.push(format!("{step}:\n  reason `{}`\n  at `{text}`\n  want `{why}` at `{at}`", e.reason));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A state-free function of the state's reads is an output epilogue: the chunked kernels form
/// the reads exactly and apply it (xLSTM's normaliser, a nonlinearity on the read).
#[test]
fn functions_of_state_reads_are_output_epilogues() {
    let io = "q = \"[K]\"\nk = \"[K]\"\nv = \"[V]\"\ngv = \"[V]\"";
    let cases = [
        ("S = S + outer(k, v)\no = max(S^T @ q, gv)", "max((S^T q), gv)"),
        ("S = S + outer(k, v)\no = tanh(2 * (S^T @ q)) + gv", "tanh(2 * (S^T q)) + gv"),
        ("S = S + outer(k, v)\ny = S^T @ q\no = where(y > 0, gv, v)", "where((S^T q) > 0, gv, v)"),
        (
            "S = S + outer(k, v)\no = (S^T @ q) / max(abs(sum(S^T @ q)), 1) + gv",
            "(S^T q) / max(abs(sum((S^T q))), 1) + gv",
        ),
        ("S = S + outer(k, v)\no = gv * (S^T @ q) + v * (S^T @ q)", "v * (S^T q) + gv * (S^T q)"),
    ];
    for (step, want) in cases {
        let r = parse(step, io);
        let c = canonicalize(&r).unwrap_or_else(|e| panic!("{step}: {}", e.reason));
        let e = c.output.epilogue.as_ref().unwrap_or_else(|| panic!("{step}: no epilogue"));
        assert_eq!(print_expr(&r, e), want, "{step}");
        assert_eq!(print_expr(&r, &c.output.query), "q");
        assert!(c.output.coef.is_none() && c.output.extra.is_none());
    }
    // A plain linear read keeps the linear form.
    let r = parse("S = S + outer(k, v)\no = gv * (S^T @ q) + v", io);
    assert!(canonicalize(&r).expect("linear").output.epilogue.is_none());
}

fn parse_with_states(step: &str, inputs: &str, states: &str) -> chunkc_dsl::ast::Rule {
    let src = format!("name = \"t\"\nstep = \"\"\"\n{step}\n\"\"\"\n\n[inputs]\n{inputs}\n\n[states]\n{states}\n");
    chunkc_dsl::parse_rule("t.toml", &src).unwrap_or_else(|d| panic!("{d}"))
}

/// A [K] state moved by S's own transition is one more column of S, its writes scalar
/// values; any other extra state keeps the recurrent kernel, with the reason.
#[test]
fn extra_states_are_columns_of_s() {
    let io = |step: &str| {
        let inputs =
            [("q", "[K]"), ("k", "[K]"), ("v", "[V]"), ("g", "scalar"), ("gk", "[K]"), ("gv", "[V]"), ("b", "scalar")];
        declared(step, &inputs)
    };
    let r = parse_with_states(
        "S = exp(g) * S + outer(b * k, v)\nn = exp(g) * n + b * k + 2\no = (S^T @ q) / max(abs(dot(n, q)), 1)",
        &io("S g b k v n q"),
        "n = \"[K]\"",
    );
    let c = canonicalize(&r).expect("chunkable");
    assert_eq!(c.columns.len(), 1);
    let col = &c.columns[0];
    let written: Vec<(String, String)> =
        col.writes.iter().map(|(k, x)| (print_expr(&r, k), print_expr(&r, x))).collect();
    assert_eq!(written, [("b * k".to_string(), "1".to_string()), ("1".to_string(), "2".to_string())]);
    assert!(col.writes.iter().all(|(k, x)| k.ty == Ty::VecK && x.ty == Ty::Scalar));
    assert_eq!(print_expr(&r, c.output.epilogue.as_ref().expect("epilogue")), "(S^T q) / max(abs(dot(n, q)), 1)");

    // Gated per key channel, and a delta rule with the normaliser under the same transition.
    let r = parse_with_states(
        "S = exp(gk) * S + outer(k, v)\nn = exp(gk) * n + k\no = S^T @ q + dot(n, q)",
        &io("gk k v q"),
        "n = \"[K]\"",
    );
    assert_eq!(canonicalize(&r).expect("gated").columns.len(), 1);
    let r = parse_with_states(
        "S = S - b * outer(k, S^T @ k) + b * outer(k, v)\nn = n - b * k * dot(k, n) + b * k\no = S^T @ q / max(dot(n, q), 1)",
        &io("b k v q"),
        "n = \"[K]\"",
    );
    assert_eq!(canonicalize(&r).expect("delta").class, Class::Delta { rank: 1, vector_gate: false });

    let refused = [
        (
            "S = exp(g) * S + outer(k, v)\nn = n + k\no = S^T @ q + dot(n, q)",
            "n = \"[K]\"",
            "not updated by S's transition",
        ),
        (
            "S = exp(g) * S + outer(k, v)\nm = exp(g) * m + v\no = S^T @ q + m",
            "m = \"[V]\"",
            "the [V] state `m` is not chunked",
        ),
        (
            "S = S * exp(gv) + outer(k, v)\nn = n + k\no = S^T @ q + dot(n, q)",
            "n = \"[K]\"",
            "next to a value-side gate",
        ),
        ("S = S + outer(k, v * dot(n, q))\nn = n + k\no = S^T @ q", "n = \"[K]\"", "states that feed each other"),
        ("S = S + outer(k, v)\nn = n + k\no = S^T @ q + dot(n, k)", "n = \"[K]\"", "two different vectors"),
        (
            "S = S + outer(k, v)\nn = n * dot(n, q) + k\no = S^T @ q",
            "n = \"[K]\"",
            "product of two values that both depend",
        ),
    ];
    for (step, states, why) in refused {
        let r = parse_with_states(step, &io(step), states);
        let e = canonicalize(&r).expect_err(step);
        assert!(e.reason.contains(why), "{step}: got `{}`", e.reason);
        assert!(e.span.end <= r.source.len() && e.span.start < e.span.end, "{step}: span {:?}", e.span);
    }
}
