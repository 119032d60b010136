//! Good rule files: the checked structure, types, targets and spans.

use chunkc_dsl::ast::{BinaryOp, Domain, Expr, ExprKind, Rule, Span, Target, Ty, UnaryOp};
use chunkc_dsl::parse_rule;

fn parse(source: &str) -> Rule {
    match parse_rule("rules/test.toml", source) {
        Ok(rule) => rule,
        Err(d) => panic!("expected a good rule, got:\n{d}"),
    }
}

fn text(source: &str, span: Span) -> &str {
    &source[span.start..span.end]
}

fn boxed(e: &ExprKind) -> Vec<&Expr> {
    match e {
        ExprKind::Unary(_, a) | ExprKind::Sum(a) | ExprKind::L2Norm(a) | ExprKind::Transpose(a) => vec![a],
        ExprKind::Binary(_, a, b) | ExprKind::Dot(a, b) | ExprKind::Outer(a, b) | ExprKind::MatMul(a, b) => {
            vec![a, b]
        }
        _ => vec![],
    }
}

/// Checks that every node's span lies in the file and that children lie within their parent.
fn assert_spans_nested(source: &str, e: &Expr) {
    assert!(e.span.start <= e.span.end && e.span.end <= source.len(), "{:?}", e.span);
    for c in boxed(&e.kind) {
        assert!(e.span.start <= c.span.start && c.span.end <= e.span.end, "{:?} not inside {:?}", c.span, e.span);
        assert_spans_nested(source, c);
    }
}

const GATED_DELTA: &str = r#"name = "gated_delta_rule"          # required; identifier [A-Za-z_][A-Za-z0-9_]*
summary = "Gated DeltaNet"         # optional string
chunked = true                     # optional bool: the rule must be chunkable
step = """
# comments run to the end of a line
S = exp(g) * S
S = S + outer(k, beta * (v - S^T @ k))
o = scale * S^T @ q
"""

[inputs]                           # required, at least one entry; declaration order is kept
q = "[K]"                          # short form: just the shape
k = { shape = "[K]", domain = "unit_norm" }
v = "[V]"
g = { shape = "scalar", domain = "log_gate" }
beta = { shape = "scalar", domain = "unit" }
"#;

#[test]
fn gated_delta_rule() {
    let src = GATED_DELTA;
    let r = parse(src);
    assert_eq!(r.name, "gated_delta_rule");
    assert_eq!(r.summary, "Gated DeltaNet");
    assert!(r.require_chunked);
    assert_eq!(text(src, r.chunked_span.unwrap()), "chunked = true");
    assert_eq!(r.path, "rules/test.toml");
    assert_eq!(r.source, src);
    let names: Vec<_> = r.inputs.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["q", "k", "v", "g", "beta"]);
    let tys: Vec<_> = r.inputs.iter().map(|i| i.ty).collect();
    assert_eq!(tys, [Ty::VecK, Ty::VecK, Ty::VecV, Ty::Scalar, Ty::Scalar]);
    let domains: Vec<_> = r.inputs.iter().map(|i| i.domain).collect();
    assert_eq!(domains, [Domain::Any, Domain::UnitNorm, Domain::Any, Domain::LogGate, Domain::Unit]);
    assert!(r.inputs.iter().all(|i| !i.per_head));
    assert_eq!(text(src, r.inputs[0].span), "q = \"[K]\"");
    assert_eq!(text(src, r.inputs[1].span), "k = { shape = \"[K]\", domain = \"unit_norm\" }");
    assert!(r.locals.is_empty());

    assert_eq!(r.stmts.len(), 3);
    let targets: Vec<_> = r.stmts.iter().map(|s| s.target.clone()).collect();
    assert_eq!(targets, [Target::State, Target::State, Target::Output]);
    assert_eq!(text(src, r.stmts[0].span), "S = exp(g) * S");
    assert_eq!(text(src, r.stmts[1].span), "S = S + outer(k, beta * (v - S^T @ k))");
    assert_eq!(text(src, r.stmts[2].span), "o = scale * S^T @ q");

    // S = exp(g) * S
    let e = &r.stmts[0].value;
    assert_eq!(e.ty, Ty::Mat);
    let ExprKind::Binary(BinaryOp::Mul, a, b) = &e.kind else { panic!("{e:?}") };
    let ExprKind::Unary(UnaryOp::Exp, g) = &a.kind else { panic!("{a:?}") };
    assert_eq!(g.kind, ExprKind::Input(3));
    assert_eq!(g.ty, Ty::Scalar);
    assert_eq!(text(src, a.span), "exp(g)");
    assert_eq!(b.kind, ExprKind::State);
    assert_eq!(text(src, e.span), "exp(g) * S");

    // S = S + outer(k, beta * (v - S^T @ k))
    let e = &r.stmts[1].value;
    let ExprKind::Binary(BinaryOp::Add, _, outer) = &e.kind else { panic!("{e:?}") };
    let ExprKind::Outer(k, bv) = &outer.kind else { panic!("{outer:?}") };
    assert_eq!(k.kind, ExprKind::Input(1));
    assert_eq!(outer.ty, Ty::Mat);
    assert_eq!(bv.ty, Ty::VecV);
    assert_eq!(text(src, bv.span), "beta * (v - S^T @ k)");
    let ExprKind::Binary(BinaryOp::Mul, beta, diff) = &bv.kind else { panic!("{bv:?}") };
    assert_eq!(beta.kind, ExprKind::Input(4));
    assert_eq!(text(src, diff.span), "(v - S^T @ k)");
    let ExprKind::Binary(BinaryOp::Sub, _, mm) = &diff.kind else { panic!("{diff:?}") };
    let ExprKind::MatMul(st, k2) = &mm.kind else { panic!("{mm:?}") };
    assert_eq!(mm.ty, Ty::VecV);
    assert_eq!(text(src, mm.span), "S^T @ k");
    assert_eq!(st.ty, Ty::MatT);
    assert_eq!(text(src, st.span), "S^T");
    let ExprKind::Transpose(s) = &st.kind else { panic!("{st:?}") };
    assert_eq!(s.kind, ExprKind::State);
    assert_eq!(text(src, s.span), "S");
    assert_eq!(k2.kind, ExprKind::Input(1));

    // o = scale * S^T @ q: `@` binds tighter than `*`.
    let e = &r.stmts[2].value;
    assert_eq!(e.ty, Ty::VecV);
    let ExprKind::Binary(BinaryOp::Mul, sc, mm) = &e.kind else { panic!("{e:?}") };
    assert_eq!(sc.kind, ExprKind::Scale);
    assert!(matches!(mm.kind, ExprKind::MatMul(..)));
    assert_eq!(text(src, mm.span), "S^T @ q");

    for s in &r.stmts {
        assert_spans_nested(src, &s.value);
    }
}

const RWKV6: &str = r#"name = "rwkv6"
step = '''
o = scale * (S^T @ q) + scale * dot(q, u * k) * v
S = exp(w) * S + outer(k, v)
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
w = { shape = "[K]", domain = "log_gate" }
u = { shape = "[K]", per_head = true }
"#;

#[test]
fn rwkv6_like_rule() {
    let src = RWKV6;
    let r = parse(src);
    assert_eq!(r.name, "rwkv6");
    assert_eq!(r.summary, "");
    assert!(!r.require_chunked);
    assert_eq!(r.chunked_span, None);
    assert!(r.inputs[4].per_head);
    assert_eq!(r.inputs[4].ty, Ty::VecK);
    assert_eq!(r.inputs[3].domain, Domain::LogGate);
    assert_eq!(r.stmts[0].target, Target::Output);
    assert_eq!(r.stmts[1].target, Target::State);

    let o = &r.stmts[0].value;
    assert_eq!(o.ty, Ty::VecV);
    let ExprKind::Binary(BinaryOp::Add, left, right) = &o.kind else { panic!("{o:?}") };
    assert_eq!(text(src, left.span), "scale * (S^T @ q)");
    assert_eq!(left.ty, Ty::VecV);
    assert_eq!(text(src, right.span), "scale * dot(q, u * k) * v");
    // (scale * dot(q, u * k)) * v
    let ExprKind::Binary(BinaryOp::Mul, sd, v) = &right.kind else { panic!("{right:?}") };
    assert_eq!(v.kind, ExprKind::Input(2));
    let ExprKind::Binary(BinaryOp::Mul, _, dot) = &sd.kind else { panic!("{sd:?}") };
    assert_eq!(dot.ty, Ty::Scalar);
    assert_eq!(text(src, dot.span), "dot(q, u * k)");
    let ExprKind::Dot(q, uk) = &dot.kind else { panic!("{dot:?}") };
    assert_eq!(q.kind, ExprKind::Input(0));
    assert_eq!(uk.ty, Ty::VecK);
    let ExprKind::Binary(BinaryOp::Mul, u, k) = &uk.kind else { panic!("{uk:?}") };
    assert_eq!((u.kind.clone(), k.kind.clone()), (ExprKind::Input(4), ExprKind::Input(1)));

    // exp(w) * S: a [K] vector scales the rows.
    let s = &r.stmts[1].value;
    let ExprKind::Binary(BinaryOp::Add, decay, _) = &s.kind else { panic!("{s:?}") };
    assert_eq!(decay.ty, Ty::Mat);
    let ExprKind::Binary(BinaryOp::Mul, ew, _) = &decay.kind else { panic!("{decay:?}") };
    assert_eq!(ew.ty, Ty::VecK);
    assert_eq!(text(src, ew.span), "exp(w)");
}

const LOCALS: &str = r#"name = "locals_and_builtins"
summary = "exercises locals, head, exp2, pow, l2norm, sum"
chunked = false
step = '''
kn = l2norm(k)                       # a [K] local
decay = exp2(-(head + 1) * pow(2, -8) * .5e1)
z = sum(kn * kn) + 1e-3
S = decay * S
S = S + outer(u * kn, x / z)
y = (S + outer(u * kn, v))^T @ q
w = S @ x
o = y + (
    x * dot(w, q)
)
kn = kn^T * 2.5E+2
z = -z
'''
[inputs]
q = "[K]"
k = " [ K ] "
v = "[V]"
x = { shape = "[ V ]" }
u = { shape = "[K]", per_head = true, domain = "positive" }
"#;

#[test]
fn rule_with_locals_and_builtins() {
    let src = LOCALS;
    let r = parse(src);
    assert!(!r.require_chunked);
    assert_eq!(text(src, r.chunked_span.unwrap()), "chunked = false");
    assert_eq!(r.inputs[1].ty, Ty::VecK);
    assert_eq!(r.inputs[3].ty, Ty::VecV);
    assert_eq!(r.inputs[4].domain, Domain::Positive);
    let locals: Vec<_> = r.locals.iter().map(|l| (l.name.as_str(), l.ty)).collect();
    assert_eq!(locals, [("kn", Ty::VecK), ("decay", Ty::Scalar), ("z", Ty::Scalar), ("y", Ty::VecV), ("w", Ty::VecK)]);
    assert_eq!(text(src, r.locals[0].span), "kn");
    let targets: Vec<_> = r.stmts.iter().map(|s| s.target.clone()).collect();
    assert_eq!(
        targets,
        [
            Target::Local(0),
            Target::Local(1),
            Target::Local(2),
            Target::State,
            Target::State,
            Target::Local(3),
            Target::Local(4),
            Target::Output,
            Target::Local(0),
            Target::Local(2),
        ]
    );

    // kn = l2norm(k)
    let e = &r.stmts[0].value;
    assert_eq!((e.ty, text(src, e.span)), (Ty::VecK, "l2norm(k)"));
    let ExprKind::L2Norm(k) = &e.kind else { panic!("{e:?}") };
    assert_eq!(k.kind, ExprKind::Input(1));

    // decay = exp2(-(head + 1) * pow(2, -8) * .5e1)
    let e = &r.stmts[1].value;
    let ExprKind::Unary(UnaryOp::Exp2, arg) = &e.kind else { panic!("{e:?}") };
    let ExprKind::Binary(BinaryOp::Mul, lhs, half) = &arg.kind else { panic!("{arg:?}") };
    assert_eq!(half.kind, ExprKind::Num(5.0));
    assert_eq!(text(src, half.span), ".5e1");
    let ExprKind::Binary(BinaryOp::Mul, neg, pow) = &lhs.kind else { panic!("{lhs:?}") };
    assert_eq!(text(src, neg.span), "-(head + 1)");
    let ExprKind::Unary(UnaryOp::Neg, paren) = &neg.kind else { panic!("{neg:?}") };
    assert_eq!(text(src, paren.span), "(head + 1)");
    let ExprKind::Binary(BinaryOp::Add, head, one) = &paren.kind else { panic!("{paren:?}") };
    assert_eq!((head.kind.clone(), one.kind.clone()), (ExprKind::Head, ExprKind::Num(1.0)));
    assert_eq!(text(src, pow.span), "pow(2, -8)");
    let ExprKind::Binary(BinaryOp::Pow, two, m8) = &pow.kind else { panic!("{pow:?}") };
    assert_eq!(two.kind, ExprKind::Num(2.0));
    let ExprKind::Unary(UnaryOp::Neg, eight) = &m8.kind else { panic!("{m8:?}") };
    assert_eq!(eight.kind, ExprKind::Num(8.0));

    // z = sum(kn * kn) + 1e-3
    let e = &r.stmts[2].value;
    let ExprKind::Binary(BinaryOp::Add, sum, eps) = &e.kind else { panic!("{e:?}") };
    assert_eq!(eps.kind, ExprKind::Num(1e-3));
    let ExprKind::Sum(kk) = &sum.kind else { panic!("{sum:?}") };
    let ExprKind::Binary(BinaryOp::Mul, kn, _) = &kk.kind else { panic!("{kk:?}") };
    assert_eq!(kn.kind, ExprKind::Local(0));
    assert_eq!(kn.ty, Ty::VecK);

    // S = decay * S: scalar with matrix.
    assert_eq!(r.stmts[3].value.ty, Ty::Mat);

    // y = (S + outer(u * kn, v))^T @ q
    let e = &r.stmts[5].value;
    assert_eq!(e.ty, Ty::VecV);
    let ExprKind::MatMul(t, q) = &e.kind else { panic!("{e:?}") };
    assert_eq!(q.kind, ExprKind::Input(0));
    assert_eq!(t.ty, Ty::MatT);
    assert_eq!(text(src, t.span), "(S + outer(u * kn, v))^T");
    let ExprKind::Transpose(m) = &t.kind else { panic!("{t:?}") };
    assert_eq!(m.ty, Ty::Mat);
    assert_eq!(text(src, m.span), "(S + outer(u * kn, v))");

    // w = S @ x with x [V] -> [K]
    let e = &r.stmts[6].value;
    assert_eq!(e.ty, Ty::VecK);
    let ExprKind::MatMul(s, x) = &e.kind else { panic!("{e:?}") };
    assert_eq!((s.kind.clone(), x.kind.clone()), (ExprKind::State, ExprKind::Input(3)));

    // o = y + (\n x * dot(w, q)\n): a statement continues while a parenthesis is open.
    let st = &r.stmts[7];
    assert_eq!(text(src, st.span), "o = y + (\n    x * dot(w, q)\n)");
    let ExprKind::Binary(BinaryOp::Add, y, _) = &st.value.kind else { panic!("{:?}", st.value) };
    assert_eq!(y.kind, ExprKind::Local(3));

    // kn = kn^T * 2.5E+2: ^T on a vector is no node, its span covers the ^T.
    let e = &r.stmts[8].value;
    let ExprKind::Binary(BinaryOp::Mul, knt, n) = &e.kind else { panic!("{e:?}") };
    assert_eq!(knt.kind, ExprKind::Local(0));
    assert_eq!(text(src, knt.span), "kn^T");
    assert_eq!(n.kind, ExprKind::Num(250.0));

    for s in &r.stmts {
        assert_spans_nested(src, &s.value);
    }
}

#[test]
fn double_transpose_unwraps() {
    let src = "name = \"t\"\nstep = '''\nS = (S^T)^T\no = S^T^T^T @ q\n'''\n[inputs]\nq = \"[K]\"\n";
    let r = parse(src);
    let e = &r.stmts[0].value;
    assert_eq!(e.kind, ExprKind::State);
    assert_eq!(e.ty, Ty::Mat);
    assert_eq!(text(src, e.span), "(S^T)^T");
    let ExprKind::MatMul(t, _) = &r.stmts[1].value.kind else { panic!() };
    assert_eq!(t.ty, Ty::MatT);
    assert_eq!(text(src, t.span), "S^T^T^T");
    let ExprKind::Transpose(s) = &t.kind else { panic!("{t:?}") };
    assert_eq!(s.kind, ExprKind::State);
    assert_eq!(text(src, s.span), "S^T^T");
}

#[test]
fn spans_map_through_basic_string_escapes() {
    // A one-line basic string with escapes: `\n` separates statements, `\u0040` is `@`.
    let src = "name = \"esc\"\nstep = \"S = S + outer(k, v)\\no = S^T \\u0040 q  # \\\"c\\\"\"\n[inputs]\nq = \"[K]\"\nk = \"[K]\"\nv = \"[V]\"\n";
    let r = parse(src);
    assert_eq!(text(src, r.stmts[0].span), "S = S + outer(k, v)");
    assert_eq!(text(src, r.stmts[1].span), "o = S^T \\u0040 q");
    let ExprKind::MatMul(st, q) = &r.stmts[1].value.kind else { panic!() };
    assert_eq!(text(src, st.span), "S^T");
    assert_eq!(text(src, q.span), "q");

    // A multi-line basic string with a line-ending backslash and CRLF line ends.
    let src = "name = \"crlf\"\r\nstep = \"\"\"\r\nS = S + \\\r\n    outer(k, v)\r\no = S^T @ q\r\n\"\"\"\r\n[inputs]\r\nq = \"[K]\"\r\nk = \"[K]\"\r\nv = \"[V]\"\r\n";
    let r = parse(src);
    let ExprKind::Binary(_, _, outer) = &r.stmts[0].value.kind else { panic!() };
    assert_eq!(text(src, outer.span), "outer(k, v)");
    assert_eq!(text(src, r.stmts[1].span), "o = S^T @ q");
}

#[test]
fn inputs_keep_declaration_order_and_table_headers_work() {
    let src = r#"name = "order"
step = '''
S = S + outer(zeta * alpha, v)
o = S^T @ alpha
'''
[inputs]
zeta = "scalar"
alpha = "[K]"

[inputs.v]
shape = "[V]"
domain = "negative"
"#;
    let r = parse(src);
    let names: Vec<_> = r.inputs.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["zeta", "alpha", "v"]);
    assert_eq!(r.inputs[2].domain, Domain::Negative);
    let ExprKind::Binary(_, _, outer) = &r.stmts[0].value.kind else { panic!() };
    let ExprKind::Outer(a, b) = &outer.kind else { panic!() };
    let ExprKind::Binary(_, z, al) = &a.kind else { panic!() };
    assert_eq!(
        (z.kind.clone(), al.kind.clone(), b.kind.clone()),
        (ExprKind::Input(0), ExprKind::Input(1), ExprKind::Input(2))
    );
}

#[test]
fn load_rule_reads_a_file() {
    let dir = std::env::temp_dir().join(format!("chunkc-dsl-good-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("rwkv6.toml");
    std::fs::write(&path, RWKV6).unwrap();
    let r = chunkc_dsl::load_rule(&path).unwrap();
    assert_eq!(r.name, "rwkv6");
    assert_eq!(r.path, path.display().to_string());
    let missing = chunkc_dsl::load_rule(&dir.join("nope.toml")).unwrap_err();
    assert!(missing.to_string().contains("cannot read rule file"), "{missing}");
    let _ = std::fs::remove_dir_all(&dir);
}
