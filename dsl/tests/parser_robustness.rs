//! No input, however broken, makes the front end panic; every error points into the file.

use chunkc_dsl::parse_rule;
use proptest::prelude::*;

const PATH: &str = "rules/fuzz.toml";

const GOOD: &str = r#"name = "gated_delta_rule"
summary = "Gated DeltaNet"
chunked = true
step = """
# comments run to the end of a line
S = exp(g) * S
kn = l2norm(k)
S = S + outer(kn, beta * (v - S^T @ kn))
o = scale * S^T @ q + pow(sum(u * q), 2) * dot(q, kn) * (
    v
)
"""

[inputs]
q = "[K]"
k = { shape = "[K]", domain = "unit_norm" }
v = "[V]"
g = { shape = "scalar", domain = "log_gate" }
beta = { shape = "scalar", domain = "unit" }
u = { shape = "[K]", per_head = true }
"#;

/// The step's positions map exactly into the file whenever the TOML part reads.
fn check_exact(source: &str) -> Result<(), TestCaseError> {
    if let Ok(file) = chunkc_dsl::parse::read_rule_file(PATH, source) {
        prop_assert!(file.step.is_exact(), "{:?}", file.step);
    }
    Ok(())
}

/// Runs the front end and checks the error's invariants (or that a success is self-consistent).
fn check(source: &str) -> Result<(), TestCaseError> {
    match parse_rule(PATH, source) {
        Ok(rule) => {
            prop_assert_eq!(&rule.source, source);
            for s in &rule.stmts {
                prop_assert!(s.span.start <= s.span.end && s.span.end <= source.len());
                prop_assert!(s.value.span.end <= source.len());
            }
        }
        Err(d) => {
            prop_assert!(d.span.start <= d.span.end, "{:?}", d.span);
            prop_assert!(d.span.end <= source.len(), "{:?} past {}", d.span, source.len());
            let text = d.to_string();
            let (line, col) = d.line_col();
            let prefix = format!("{PATH}:{line}:{col}: error: ");
            prop_assert!(text.starts_with(&prefix), "{}", text);
            prop_assert!(text.contains('^'), "{}", text);
            prop_assert!(d.help.as_deref().is_some_and(|h| !h.is_empty()), "{}", text);
        }
    }
    Ok(())
}

/// Clamps a byte index down to a char boundary.
fn boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[derive(Clone, Debug)]
enum Edit {
    Delete(usize, usize),
    Insert(usize, String),
    Duplicate(usize, usize, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    let pos = 0..GOOD.len() + 1;
    let snippet = prop_oneof![
        Just("(".to_string()),
        Just(")".to_string()),
        Just("\n".to_string()),
        Just("'''".to_string()),
        Just("\"".to_string()),
        Just("[".to_string()),
        Just("=".to_string()),
        Just("^T".to_string()),
        Just("\\".to_string()),
        Just("é".to_string()),
        "[ -~\n\t]{0,8}",
    ];
    prop_oneof![
        (pos.clone(), 0..40usize).prop_map(|(a, n)| Edit::Delete(a, a + n)),
        (pos.clone(), snippet).prop_map(|(a, s)| Edit::Insert(a, s)),
        (pos.clone(), 0..60usize, pos).prop_map(|(a, n, at)| Edit::Duplicate(a, a + n, at)),
    ]
}

fn apply(mut s: String, edits: &[Edit]) -> String {
    for e in edits {
        match e {
            Edit::Delete(a, b) => {
                let (a, b) = (boundary(&s, *a), boundary(&s, *b));
                s.replace_range(a..b.max(a), "");
            }
            Edit::Insert(at, t) => {
                let at = boundary(&s, *at);
                s.insert_str(at, t);
            }
            Edit::Duplicate(a, b, at) => {
                let (a, b) = (boundary(&s, *a), boundary(&s, *b));
                let piece = s[a..b.max(a)].to_string();
                let at = boundary(&s, *at);
                s.insert_str(at, &piece);
            }
        }
    }
    s
}

fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "S", "o", "q", "k", "v", "g", "beta", "u", "x", "scale", "head", "exp", "exp2", "log", "sigmoid",
            "softplus", "silu", "sqrt", "pow", "l2norm", "sum", "dot", "outer", "+", "-", "*", "/", "@", "^T", "^",
            "(", ")", ",", "=", "\n", "\n", "#", "1", "0.5", ".5", "1e-3", "2.5E+2", "1e", "1.2.3", " ", "T", "\t",
            "$", "é", "\r\n",
        ])
        .prop_map(str::to_string),
        "[a-zA-Z_][a-zA-Z0-9_]{0,4}",
    ]
}

const HEADER: &str = "name = \"soup\"\nstep = '''\n";
const FOOTER: &str =
    "\n'''\n[inputs]\nq = \"[K]\"\nk = \"[K]\"\nv = \"[V]\"\ng = \"scalar\"\nbeta = \"scalar\"\nu = \"[K]\"\n";

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_files_never_panic(source in "(?s).{0,300}") {
        check(&source)?;
    }

    #[test]
    fn random_toml_like_files_never_panic(source in "[a-z_ =\"'\\[\\]{},.\n#0-9()^@*+-]{0,200}") {
        check(&source)?;
    }

    #[test]
    fn edited_good_rule_never_panics(edits in prop::collection::vec(edit(), 1..4)) {
        let source = apply(GOOD.to_string(), &edits);
        check_exact(&source)?;
        check(&source)?;
    }

    #[test]
    fn token_soup_in_step_never_panics(tokens in prop::collection::vec(token(), 0..40), spaced in any::<bool>()) {
        let sep = if spaced { " " } else { "" };
        let source = format!("{HEADER}{}{FOOTER}", tokens.join(sep));
        check_exact(&source)?;
        check(&source)?;
    }

    #[test]
    fn token_soup_in_escaped_basic_string_never_panics(tokens in prop::collection::vec(token(), 0..30)) {
        // The same soup inside a one-line basic string, newlines written as escapes.
        let body: String = tokens.concat().replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n").replace('\r', "\\r").replace('\t', "\\t");
        let source = format!("name = \"soup\"\nstep = \"{body}\"\n[inputs]\nq = \"[K]\"\nk = \"[K]\"\nv = \"[V]\"\n");
        check_exact(&source)?;
        check(&source)?;
    }
}

#[test]
fn the_good_rule_is_good() {
    if let Err(d) = parse_rule(PATH, GOOD) {
        panic!("{d}");
    }
}

#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    for body in [
        format!("o = {}v{}", "(".repeat(100_000), ")".repeat(100_000)),
        format!("o = {}v", "-".repeat(100_000)),
        format!("o = v{}", " + v".repeat(100_000)),
        format!("o = S{} @ q", "^T".repeat(100_000)),
        format!("o = {}v{}", "exp(".repeat(10_000), ")".repeat(10_000)),
    ] {
        let source = format!("{HEADER}S = S\n{body}{FOOTER}");
        let d = parse_rule(PATH, &source).unwrap_err();
        assert!(d.message.contains("too deep") || d.message.contains("nested too deeply"), "{d}");
    }
}

#[test]
fn huge_flat_step_is_fine() {
    let body = "S = S + outer(k, v)\n".repeat(20_000);
    let source = format!("{HEADER}{body}o = S^T @ q + 0 * (g + beta) * sum(u){FOOTER}");
    assert_eq!(parse_rule(PATH, &source).unwrap().stmts.len(), 20_001);
}

#[test]
fn deeply_nested_toml_is_an_error_not_a_crash() {
    for source in [
        format!("name = {}", "[".repeat(100_000)),
        format!("name = {}1{}", "[".repeat(10_000), "]".repeat(10_000)),
        format!("name = {}", "{ a = ".repeat(10_000)),
        format!("{}= 1", "a.".repeat(10_000)),
    ] {
        let d = parse_rule(PATH, &source).unwrap_err();
        assert!(d.to_string().starts_with(&format!("{PATH}:1:")), "{d}");
    }
}
