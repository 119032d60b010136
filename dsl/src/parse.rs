//! Rule-file parsing: the TOML document with spans ([`read_rule_file`]) and the step's
//! expression language ([`parse_step`]), producing an untyped syntax tree that `check` types.
//!
//! All spans handed out by this module's public types are either byte ranges into the whole
//! rule file (the TOML part) or byte ranges into the decoded step text ([`PStmt`], [`PExpr`]);
//! [`StepText::file_span`] maps the latter into the file.

// `Diagnostic` is the error type of the public entry points (a fixed API); boxing it inside
// this module alone would buy nothing.
#![allow(clippy::result_large_err)]

#[path = "lexer.rs"]
pub mod lexer;

use crate::ast::{BinaryOp, Domain, Span, Ty};
use crate::diag::Diagnostic;
use lexer::{Tok, Token};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// The top-level keys of a rule file.
pub const TOP_LEVEL_KEYS: [&str; 6] = ["name", "summary", "chunked", "step", "inputs", "states"];
/// The keys of an input table.
pub const INPUT_KEYS: [&str; 3] = ["shape", "domain", "per_head"];
/// Functions of the step language, in the order help texts list them.
pub const FUNCTIONS: [&str; 19] = [
    "exp", "exp2", "log", "sigmoid", "softplus", "silu", "sqrt", "abs", "tanh", "relu", "min", "max", "clip", "where",
    "pow", "l2norm", "sum", "dot", "outer",
];
/// The tensors a program takes and gives beside the rule's inputs: the state entering and
/// leaving a sequence, and the loss' cotangents of `o` and `hT` for the gradient. No input
/// may take their names.
pub const STATE_TENSORS: [&str; 4] = ["h0", "hT", "do", "dhT"];
/// Names with a fixed meaning in the step (besides the functions).
pub const BUILTIN_NAMES: [&str; 4] = ["S", "o", "scale", "head"];

/// Deepest expression tree accepted (keeps every recursive pass over the tree, in this crate and
/// later, far from the stack limit).
pub const MAX_EXPR_DEPTH: usize = 200;
/// Deepest nesting of parentheses, calls and unary minus accepted by the parser.
pub const MAX_NESTING: usize = 64;

/// True for `[A-Za-z_][A-Za-z0-9_]*`.
pub fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// True for names that neither inputs nor locals may take.
pub fn is_reserved(s: &str) -> bool {
    BUILTIN_NAMES.contains(&s) || FUNCTIONS.contains(&s)
}

/// One `[inputs]` entry, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct InputDecl {
    pub name: String,
    /// The key in `[inputs]`.
    pub name_span: Span,
    /// The whole declaration (key and value).
    pub span: Span,
    pub ty: Ty,
    pub domain: Domain,
    pub per_head: bool,
}

/// The `step` string: its decoded text and the map from text positions to file positions.
#[derive(Clone, Debug, PartialEq)]
pub struct StepText {
    pub text: String,
    /// The `step` key.
    pub key_span: Span,
    /// The string, with its quotes.
    pub value_span: Span,
    /// File offset of each byte of `text` (plus one past the end), and the file offset just
    /// after the source of each byte. Empty when the positions could not be mapped.
    starts: Vec<usize>,
    ends: Vec<usize>,
}

impl StepText {
    /// Builds the map for a string value whose source (quotes included) is
    /// `source[value_span]` and whose decoded value, as TOML read it, is `text`.
    pub fn new(source: &str, key_span: Span, value_span: Span, text: &str) -> StepText {
        let raw = source.get(value_span.start..value_span.end).unwrap_or("");
        let (starts, ends) = match decode_string(raw, value_span.start) {
            Some((decoded, starts, ends)) if decoded == text => (starts, ends),
            // Not expected to happen (the decoder follows TOML 1.1); positions then all point at
            // the string's opening quote rather than at a wrong place.
            _ => (Vec::new(), Vec::new()),
        };
        StepText { text: text.to_string(), key_span, value_span, starts, ends }
    }

    /// True when step positions map exactly into the file.
    pub fn is_exact(&self) -> bool {
        !self.starts.is_empty()
    }

    /// Maps a byte range of the step text to the rule file.
    pub fn file_span(&self, local: Span) -> Span {
        let fallback = self.value_span.start;
        let start = self.starts.get(local.start).or(self.starts.last()).copied().unwrap_or(fallback);
        let end = if local.end > local.start {
            self.ends.get(local.end - 1).or(self.ends.last()).copied().unwrap_or(fallback + 1)
        } else {
            start
        };
        Span::new(start, end.max(start))
    }
}

/// Decodes a TOML string from its source text (with quotes), recording where each decoded byte
/// came from. `base` is the file offset of `raw`.
fn decode_string(raw: &str, base: usize) -> Option<(String, Vec<usize>, Vec<usize>)> {
    let (delim, multiline) = if raw.starts_with("'''") || raw.starts_with("\"\"\"") {
        (3, true)
    } else if raw.starts_with('\'') || raw.starts_with('"') {
        (1, false)
    } else {
        return None;
    };
    if raw.len() < 2 * delim {
        return None;
    }
    let literal = raw.starts_with('\'');
    let mut pos = delim;
    let end = raw.len() - delim;
    if multiline {
        if raw.get(pos..)?.starts_with("\r\n") {
            pos += 2;
        } else if raw.get(pos..)?.starts_with('\n') {
            pos += 1;
        }
    }
    let body = raw.get(..end)?;
    let mut out = String::new();
    let mut starts = Vec::new();
    let mut ends = Vec::new();
    let mut push = |out: &mut String, c: char, from: usize, to: usize| {
        out.push(c);
        for _ in 0..c.len_utf8() {
            starts.push(base + from);
            ends.push(base + to);
        }
    };
    while pos < end {
        let c = body.get(pos..)?.chars().next()?;
        if literal || c != '\\' {
            push(&mut out, c, pos, pos + c.len_utf8());
            pos += c.len_utf8();
            continue;
        }
        let esc = body.get(pos + 1..)?.chars().next()?;
        let simple = match esc {
            'b' => Some('\u{8}'),
            't' => Some('\t'),
            'n' => Some('\n'),
            'f' => Some('\u{c}'),
            'r' => Some('\r'),
            'e' => Some('\u{1b}'),
            '"' => Some('"'),
            '\\' => Some('\\'),
            _ => None,
        };
        if let Some(ch) = simple {
            push(&mut out, ch, pos, pos + 2);
            pos += 2;
            continue;
        }
        let digits = match esc {
            'x' => 2,
            'u' => 4,
            'U' => 8,
            _ => 0,
        };
        if digits > 0 {
            let hex = body.get(pos + 2..pos + 2 + digits)?;
            let ch = char::from_u32(u32::from_str_radix(hex, 16).ok()?)?;
            push(&mut out, ch, pos, pos + 2 + digits);
            pos += 2 + digits;
            continue;
        }
        // A line-ending backslash: drop it and all whitespace (newlines included) after it.
        if multiline && matches!(esc, ' ' | '\t' | '\r' | '\n') {
            pos += 1;
            while body.as_bytes().get(pos).is_some_and(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n')) {
                pos += 1;
            }
            continue;
        }
        return None;
    }
    starts.push(base + end.min(pos));
    Some((out, starts, ends))
}

/// The rule file's TOML part, checked; the step text not yet parsed.
#[derive(Clone, Debug, PartialEq)]
pub struct RuleFile {
    pub name: String,
    pub name_span: Span,
    pub summary: String,
    pub chunked: bool,
    /// `chunked = ...`, when present.
    pub chunked_span: Option<Span>,
    /// In declaration order.
    pub inputs: Vec<InputDecl>,
    /// The `[states]` table's states beside `S`, in declaration order.
    pub states: Vec<StateEntry>,
    pub step: StepText,
}

/// One `[states]` entry other than `S = "[K,V]"`, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct StateEntry {
    pub name: String,
    /// `VecK` or `VecV`.
    pub ty: Ty,
    /// The key in `[states]`.
    pub name_span: Span,
    /// The whole entry.
    pub span: Span,
}

/// Builds diagnostics for one file.
#[derive(Clone, Copy, Debug)]
pub struct Reporter<'a> {
    pub path: &'a str,
    pub source: &'a str,
}

impl Reporter<'_> {
    /// An error with a label and a help sentence; the span is clamped into the source.
    pub fn error(
        &self,
        span: Span,
        message: impl Into<String>,
        label: impl Into<String>,
        help: impl Into<String>,
    ) -> Diagnostic {
        let len = self.source.len();
        let span = Span::new(span.start.min(len), span.end.min(len).max(span.start.min(len)));
        Diagnostic::error(self.path, self.source, span, message).with_label(label).with_help(help)
    }
}

fn span_of<T>(s: &Spanned<T>) -> Span {
    let r = s.span();
    Span::new(r.start, r.end)
}

fn a_type(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a datetime",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

/// A table's entries in source order (the TOML map itself is sorted by key).
fn entries<'t, 'i>(t: &'t DeTable<'i>) -> Vec<(&'t Spanned<std::borrow::Cow<'i, str>>, &'t Spanned<DeValue<'i>>)> {
    let mut v: Vec<_> = t.iter().collect();
    v.sort_by_key(|(k, _)| (k.span().start, k.span().end));
    v
}

/// Parses a shape string: `scalar`, `[K]` or `[V]`, spaces tolerated.
pub fn parse_shape(s: &str) -> Option<Ty> {
    let s = s.trim();
    if s == "scalar" {
        return Some(Ty::Scalar);
    }
    match s.strip_prefix('[')?.strip_suffix(']')?.trim() {
        "K" => Some(Ty::VecK),
        "V" => Some(Ty::VecV),
        _ => None,
    }
}

/// Reads the TOML part of a rule file and checks everything but the step's statements.
pub fn read_rule_file(path: &str, source: &str) -> Result<RuleFile, Diagnostic> {
    let r = Reporter { path, source };
    let doc = DeTable::parse(source).map_err(|e| {
        let span = e.span().map_or(Span::default(), |s| Span::new(s.start, s.end));
        let msg = e.message().lines().next().unwrap_or("syntax error").trim().to_string();
        r.error(
            span,
            format!("invalid TOML: {msg}"),
            "TOML syntax error",
            "fix the TOML syntax here; strings need quotes, and a multi-line step goes between ''' and '''",
        )
    })?;
    let doc = doc.get_ref();
    let top = entries(doc);

    for (k, _) in &top {
        if !TOP_LEVEL_KEYS.contains(&k.get_ref().as_ref()) {
            return Err(r.error(
                span_of(k),
                format!("unknown top-level key `{}`", k.get_ref()),
                "not a rule-file key",
                "the top-level keys are name, summary, chunked, step, inputs and states",
            ));
        }
    }
    let get = |key: &str| top.iter().find(|(k, _)| k.get_ref() == key).copied();

    // Keys written after an [inputs] or [states] header land in that table.
    for table in ["inputs", "states"] {
        let Some((_, value)) = get(table) else { continue };
        let DeValue::Table(t) = value.get_ref() else { continue };
        for (k, v) in entries(t) {
            let key = k.get_ref().as_ref();
            let misplaced = match v.get_ref() {
                // `name` and `step` are required (and missing here); an optional key that
                // reads as a shape may be a genuine input.
                DeValue::String(s) => key == "name" || key == "step" || parse_shape(s).is_none(),
                DeValue::Table(_) => false,
                _ => true,
            };
            if ["name", "summary", "chunked", "step", "inputs"].contains(&key) && get(key).is_none() && misplaced {
                return Err(r.error(
                    span_of(k),
                    format!("`{key}` is inside the [{table}] table"),
                    format!("read as {}", if table == "inputs" { "an input" } else { "a state" }),
                    format!("move `{key} = ...` above the [{table}] line: TOML puts every key that follows a [table] header into that table"),
                ));
            }
        }
    }

    let missing = |key: &str, help: &str| {
        r.error(Span::new(0, 0), format!("missing `{key}`"), format!("`{key}` is required"), help)
    };
    let wrong_type = |k: &Spanned<std::borrow::Cow<'_, str>>, v: &Spanned<DeValue<'_>>, want: &str, help: &str| {
        r.error(
            span_of(v),
            format!("`{}` must be {want}, found {}", k.get_ref(), a_type(v.get_ref())),
            format!("expected {want}"),
            help,
        )
    };

    // name
    let Some((name_key, name_val)) = get("name") else {
        return Err(missing("name", "add `name = \"my_rule\"` at the top of the file"));
    };
    let DeValue::String(name) = name_val.get_ref() else {
        return Err(wrong_type(name_key, name_val, "a string", "write the rule's name in quotes: name = \"my_rule\""));
    };
    if !is_identifier(name) {
        return Err(r.error(
            span_of(name_val),
            format!("invalid rule name `{}`", name.escape_debug()),
            "not an identifier",
            "a rule name is a letter or `_` followed by letters, digits or `_`, e.g. gated_delta",
        ));
    }

    // summary
    let summary = match get("summary") {
        None => String::new(),
        Some((k, v)) => match v.get_ref() {
            DeValue::String(s) => s.to_string(),
            _ => return Err(wrong_type(k, v, "a string", "write the summary in quotes: summary = \"...\"")),
        },
    };

    // chunked
    let (chunked, chunked_span) = match get("chunked") {
        None => (false, None),
        Some((k, v)) => match v.get_ref() {
            DeValue::Boolean(b) => (*b, Some(span_of(k).join(span_of(v)))),
            _ => return Err(wrong_type(k, v, "a boolean", "write chunked = true or chunked = false (no quotes)")),
        },
    };

    // inputs
    let Some((inputs_key, inputs_val)) = get("inputs") else {
        return Err(missing("inputs", "add an [inputs] table that declares each input's shape, e.g. q = \"[K]\""));
    };
    let DeValue::Table(inputs_table) = inputs_val.get_ref() else {
        return Err(wrong_type(
            inputs_key,
            inputs_val,
            "a table",
            "write an [inputs] header followed by one `name = \"shape\"` line per input",
        ));
    };
    if inputs_table.is_empty() {
        return Err(r.error(
            span_of(inputs_val),
            "[inputs] declares no inputs",
            "empty table",
            "declare each input that the step reads, e.g. q = \"[K]\"",
        ));
    }
    let mut inputs = Vec::new();
    for (k, v) in entries(inputs_table) {
        inputs.push(read_input(&r, k, v)?);
    }

    // step
    let Some((step_key, step_val)) = get("step") else {
        return Err(missing(
            "step",
            "add `step = '''...'''` above [inputs], with one `NAME = expr` statement per line",
        ));
    };
    let DeValue::String(step) = step_val.get_ref() else {
        return Err(wrong_type(
            step_key,
            step_val,
            "a string",
            "write the step as a multi-line string: step = '''...'''",
        ));
    };
    let step = StepText::new(source, span_of(step_key), span_of(step_val), step);

    let states = match get("states") {
        None => vec![],
        Some((k, v)) => match v.get_ref() {
            DeValue::Table(t) => read_states(&r, t, &inputs)?,
            _ => {
                return Err(wrong_type(
                    k,
                    v,
                    "a table",
                    "write a [states] header followed by one `name = \"shape\"` line per state, e.g. n = \"[K]\"",
                ))
            }
        },
    };

    Ok(RuleFile {
        name: name.to_string(),
        name_span: span_of(name_val),
        summary,
        chunked,
        chunked_span,
        inputs,
        states,
        step,
    })
}

/// The `[states]` table: `S = "[K,V]"` (the default, so optional) and vector states
/// `name = "[K]"` or `"[V]"`, whose tensors `<name>0`, `<name>T` (and the gradient's
/// `d<name>0`, `d<name>T`) must not collide with an input.
fn read_states(r: &Reporter<'_>, t: &DeTable<'_>, inputs: &[InputDecl]) -> Result<Vec<StateEntry>, Diagnostic> {
    let help = "a [states] entry is S = \"[K,V]\" or a vector state, name = \"[K]\" or name = \"[V]\"";
    let mut states = vec![];
    for (k, v) in entries(t) {
        let name = k.get_ref().as_ref();
        let name_span = span_of(k);
        let DeValue::String(shape) = v.get_ref() else {
            return Err(r.error(
                span_of(v),
                format!("the shape of state `{name}` must be a string, found {}", a_type(v.get_ref())),
                "expected a string",
                help,
            ));
        };
        let compact: String = shape.chars().filter(|c| !c.is_whitespace()).collect();
        if name == "S" {
            if compact != "[K,V]" {
                return Err(r.error(
                    span_of(v),
                    format!("the state `S` is [K, V], not `{}`", shape.escape_debug()),
                    "S is the [K, V] state",
                    "write S = \"[K,V]\" (or leave it out: it is the default); a vector state takes another name",
                ));
            }
            continue;
        }
        if compact == "[K,V]" {
            return Err(r.error(
                name_span,
                format!("a second [K, V] state (`{name}`) is not supported"),
                "only S is a matrix",
                "a rule has one matrix state, S; other states are [K] or [V] vectors",
            ));
        }
        let ty = match parse_shape(shape) {
            Some(ty @ (Ty::VecK | Ty::VecV)) => ty,
            _ => {
                return Err(r.error(
                    span_of(v),
                    format!("bad shape `{}` for state `{name}`", shape.escape_debug()),
                    "not a state shape",
                    help,
                ))
            }
        };
        if !is_identifier(name) || is_reserved(name) || STATE_TENSORS.contains(&name) {
            return Err(r.error(
                name_span,
                format!("`{}` cannot name a state", name.escape_debug()),
                "invalid or reserved name",
                format!(
                    "a state name is an identifier other than {}, {} and the functions",
                    BUILTIN_NAMES.join(", "),
                    STATE_TENSORS.join(", ")
                ),
            ));
        }
        let tensors = [format!("{name}0"), format!("{name}T"), format!("d{name}0"), format!("d{name}T")];
        let clash = inputs.iter().find(|i| i.name == name || tensors.contains(&i.name));
        if let Some(i) = clash {
            return Err(r.error(
                name_span,
                format!("state `{name}` collides with the input `{}`", i.name),
                "state declared here",
                format!(
                    "the state `{name}` owns the names {name}, {}; rename the state or the input",
                    tensors.join(", ")
                ),
            ));
        }
        if let Some(other) = states.iter().find(|s: &&StateEntry| tensors.contains(&s.name)) {
            return Err(r.error(
                name_span,
                format!("state `{name}`'s tensors collide with the state `{}`", other.name),
                "state declared here",
                "rename one of the states",
            ));
        }
        states.push(StateEntry { name: name.to_string(), ty, name_span, span: name_span.join(span_of(v)) });
    }
    Ok(states)
}

fn read_input(
    r: &Reporter<'_>,
    k: &Spanned<std::borrow::Cow<'_, str>>,
    v: &Spanned<DeValue<'_>>,
) -> Result<InputDecl, Diagnostic> {
    let name = k.get_ref().as_ref();
    let name_span = span_of(k);
    if !is_identifier(name) {
        return Err(r.error(
            name_span,
            format!("invalid input name `{}`", name.escape_debug()),
            "not an identifier",
            "input names are a letter or `_` followed by letters, digits or `_`",
        ));
    }
    if STATE_TENSORS.contains(&name) {
        let which = match name {
            "h0" => "the initial state",
            "hT" => "the final state",
            "do" => "the output's cotangent",
            _ => "the final state's cotangent",
        };
        return Err(r.error(
            name_span,
            format!("`{name}` names {which} tensor and cannot name an input"),
            "reserved tensor name",
            format!("rename the input; {} name the states and their cotangents", STATE_TENSORS.join(", ")),
        ));
    }
    if is_reserved(name) {
        return Err(r.error(
            name_span,
            format!("`{name}` is reserved and cannot name an input"),
            "reserved name",
            format!(
                "rename the input; {} and the functions ({}) are reserved",
                BUILTIN_NAMES.join(", "),
                FUNCTIONS.join(", ")
            ),
        ));
    }
    let shape_help = "shapes are \"scalar\", \"[K]\" and \"[V]\"";
    let (shape_val, domain_val, per_head_val) = match v.get_ref() {
        DeValue::String(_) => (v, None, None),
        DeValue::Table(t) => {
            let entries = entries(t);
            for (tk, _) in &entries {
                if !INPUT_KEYS.contains(&tk.get_ref().as_ref()) {
                    return Err(r.error(
                        span_of(tk),
                        format!("unknown key `{}` in input `{name}`", tk.get_ref()),
                        "not an input key",
                        "an input table takes shape, domain and per_head",
                    ));
                }
            }
            let find = |key: &str| entries.iter().find(|(tk, _)| tk.get_ref() == key).map(|(_, tv)| *tv);
            let Some(shape) = find("shape") else {
                return Err(r.error(
                    span_of(v),
                    format!("input `{name}` has no shape"),
                    "`shape` is missing",
                    format!("add shape = \"scalar\", \"[K]\" or \"[V]\" to `{name}`"),
                ));
            };
            (shape, find("domain"), find("per_head"))
        }
        other => {
            return Err(r.error(
                span_of(v),
                format!("input `{name}` must be a shape string or a table, found {}", a_type(other)),
                "expected a shape or a table",
                format!("write {name} = \"[K]\" or {name} = {{ shape = \"[K]\", domain = \"any\" }}"),
            ));
        }
    };
    let DeValue::String(shape) = shape_val.get_ref() else {
        return Err(r.error(
            span_of(shape_val),
            format!("the shape of `{name}` must be a string, found {}", a_type(shape_val.get_ref())),
            "expected a string",
            shape_help,
        ));
    };
    let Some(ty) = parse_shape(shape) else {
        return Err(r.error(
            span_of(shape_val),
            format!("bad shape `{}` for input `{name}`", shape.escape_debug()),
            "not a shape",
            shape_help,
        ));
    };
    let domain_names = Domain::ALL.map(|d| d.name()).join(", ");
    let domain = match domain_val {
        None => Domain::Any,
        Some(dv) => {
            let DeValue::String(d) = dv.get_ref() else {
                return Err(r.error(
                    span_of(dv),
                    format!("the domain of `{name}` must be a string, found {}", a_type(dv.get_ref())),
                    "expected a string",
                    format!("domains are {domain_names}"),
                ));
            };
            let Some(domain) = Domain::ALL.into_iter().find(|x| x.name() == d.as_ref()) else {
                return Err(r.error(
                    span_of(dv),
                    format!("unknown domain `{}` for input `{name}`", d.escape_debug()),
                    "not a domain",
                    format!("domains are {domain_names}"),
                ));
            };
            if domain == Domain::UnitNorm && ty == Ty::Scalar {
                return Err(r.error(
                    span_of(dv),
                    format!("`unit_norm` needs a vector, but `{name}` is a scalar"),
                    "only for [K] or [V] inputs",
                    "give the input a vector shape, or pick another domain (any, log_gate, unit, positive, negative)",
                ));
            }
            domain
        }
    };
    let per_head = match per_head_val {
        None => false,
        Some(pv) => match pv.get_ref() {
            DeValue::Boolean(b) => *b,
            other => {
                return Err(r.error(
                    span_of(pv),
                    format!("`per_head` of `{name}` must be a boolean, found {}", a_type(other)),
                    "expected true or false",
                    "write per_head = true or per_head = false (no quotes)",
                ));
            }
        },
    };
    Ok(InputDecl { name: name.to_string(), name_span, span: name_span.join(span_of(v)), ty, domain, per_head })
}

// ---------------------------------------------------------------------------------------------
// The step language.

/// One statement `target = value`; spans are byte ranges in the step text.
#[derive(Clone, Debug, PartialEq)]
pub struct PStmt {
    pub target: String,
    pub target_span: Span,
    pub value: PExpr,
    pub span: Span,
}

/// An untyped expression; `span` is a byte range in the step text. A parenthesized expression's
/// span includes its parentheses.
#[derive(Clone, Debug, PartialEq)]
pub struct PExpr {
    pub kind: PKind,
    pub span: Span,
    /// Height of the tree (1 for a leaf).
    pub depth: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub enum PKind {
    Num(f64),
    Name(String),
    Call {
        name: String,
        name_span: Span,
        args: Vec<PExpr>,
    },
    Neg(Box<PExpr>),
    /// `+ - * /` and the comparisons (never a function such as `pow`: those are calls); the
    /// span is the operator's.
    Binary(BinaryOp, Span, Box<PExpr>, Box<PExpr>),
    /// `a @ b`; the span is the operator's.
    MatMul(Span, Box<PExpr>, Box<PExpr>),
    /// `x^T`; the span is the `^T`'s.
    Transpose(Box<PExpr>, Span),
}

impl PKind {
    /// The direct subexpressions.
    pub fn children(&self) -> Vec<&PExpr> {
        match self {
            PKind::Num(_) | PKind::Name(_) => vec![],
            PKind::Call { args, .. } => args.iter().collect(),
            PKind::Neg(a) | PKind::Transpose(a, _) => vec![a],
            PKind::Binary(_, _, a, b) | PKind::MatMul(_, a, b) => vec![a, b],
        }
    }
}

/// A syntax error in the step; the span is a byte range in the step text.
#[derive(Clone, Debug, PartialEq)]
pub struct StepError {
    pub span: Span,
    pub message: String,
    pub label: String,
    pub help: String,
}

impl StepError {
    fn new(span: Span, message: impl Into<String>, label: impl Into<String>, help: impl Into<String>) -> StepError {
        StepError { span, message: message.into(), label: label.into(), help: help.into() }
    }

    /// The diagnostic, with the span mapped into the file.
    pub fn into_diagnostic(self, r: &Reporter<'_>, step: &StepText) -> Diagnostic {
        r.error(step.file_span(self.span), self.message, self.label, self.help)
    }
}

/// Parses the step into statements.
pub fn parse_step(path: &str, source: &str, step: &StepText) -> Result<Vec<PStmt>, Diagnostic> {
    let r = Reporter { path, source };
    parse_step_text(&step.text).map_err(|e| e.into_diagnostic(&r, step))
}

/// Parses step text into statements; errors carry spans into `text`.
pub fn parse_step_text(text: &str) -> Result<Vec<PStmt>, StepError> {
    let tokens = lexer::lex(text).map_err(|e| StepError::new(e.span, e.message, e.label, e.help))?;
    let mut stmts = Vec::new();
    for line in tokens.split(|t| t.tok == Tok::Newline) {
        if !line.is_empty() {
            stmts.push(parse_stmt(text, line)?);
        }
    }
    Ok(stmts)
}

/// The comparison a token stands for.
fn comparison(tok: &Tok) -> Option<BinaryOp> {
    Some(match tok {
        Tok::Lt => BinaryOp::Lt,
        Tok::Le => BinaryOp::Le,
        Tok::Gt => BinaryOp::Gt,
        Tok::Ge => BinaryOp::Ge,
        Tok::EqEq => BinaryOp::Equal,
        Tok::Ne => BinaryOp::NotEqual,
        _ => return None,
    })
}

fn slice(text: &str, span: Span) -> &str {
    text.get(span.start..span.end).unwrap_or("")
}

const STMT_HELP: &str = "each line of the step is one assignment `NAME = expr` to S, o or a local; \
                         a statement continues on the next line only while a parenthesis is open";

fn parse_stmt(text: &str, line: &[Token]) -> Result<PStmt, StepError> {
    let (Some(first), Some(last)) = (line.first(), line.last()) else {
        return Err(StepError::new(Span::default(), "empty statement", "", STMT_HELP));
    };
    let whole = first.span.join(last.span);
    let Some(eq) = line.iter().position(|t| t.tok == Tok::Eq) else {
        return Err(StepError::new(whole, "statement without `=`", "expected `NAME = expr`", STMT_HELP));
    };
    let target = match (eq, &first.tok) {
        (1, Tok::Ident(name)) => name.clone(),
        (0, _) => {
            return Err(StepError::new(
                first.span,
                "missing the name to assign to",
                "nothing before `=`",
                "write `NAME = expr`; the name is S, o or a local",
            ));
        }
        _ => {
            let lhs = first.span.join(line[eq - 1].span);
            return Err(StepError::new(
                lhs,
                format!("cannot assign to `{}`", slice(text, lhs)),
                "not a name",
                "the left side of `=` must be a single name: S, o or a local",
            ));
        }
    };
    let rest = &line[eq + 1..];
    if rest.is_empty() {
        return Err(StepError::new(
            line[eq].span,
            format!("missing the value of `{target}`"),
            "nothing after `=`",
            "write an expression after `=`; a statement continues on the next line only while a parenthesis is open",
        ));
    }
    let mut p = Parser { text, toks: rest, pos: 0, nesting: 0, end: last.span.end };
    let value = p.expr()?;
    if let Some(t) = p.peek() {
        let (label, help) = if t.tok == Tok::Eq {
            ("a second `=`", "a statement has one `=`; put each assignment on its own line")
        } else {
            (
                "expected an operator or the end of the line",
                "write an operator (+ - * / @) between two operands, or start a new line for a new statement",
            )
        };
        return Err(StepError::new(
            t.span,
            format!("unexpected {} after the expression", lexer::describe(&t.tok, slice(text, t.span))),
            label,
            help,
        ));
    }
    Ok(PStmt { target, target_span: first.span, span: first.span.join(value.span), value })
}

struct Parser<'a> {
    text: &'a str,
    toks: &'a [Token],
    pos: usize,
    nesting: usize,
    /// End of the statement (where "end of statement" errors point).
    end: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Token> {
        self.toks.get(self.pos)
    }

    fn peek_tok(&self) -> Option<&Tok> {
        self.peek().map(|t| &t.tok)
    }

    fn found(&self) -> (Span, String) {
        match self.peek() {
            Some(t) => (t.span, lexer::describe(&t.tok, slice(self.text, t.span))),
            None => (Span::new(self.end, self.end), "the end of the statement".to_string()),
        }
    }

    fn node(&self, kind: PKind, span: Span) -> Result<PExpr, StepError> {
        let depth = 1 + kind.children().iter().map(|c| c.depth).max().unwrap_or(0);
        if depth > MAX_EXPR_DEPTH {
            return Err(StepError::new(
                span,
                format!("expression too deep (more than {MAX_EXPR_DEPTH} levels)"),
                "too deeply nested",
                "split the expression into several statements using locals",
            ));
        }
        Ok(PExpr { kind, span, depth })
    }

    fn enter(&mut self, span: Span) -> Result<(), StepError> {
        self.nesting += 1;
        if self.nesting > MAX_NESTING {
            return Err(StepError::new(
                span,
                format!("expression nested too deeply (more than {MAX_NESTING} levels)"),
                "too deeply nested",
                "split the expression into several statements using locals",
            ));
        }
        Ok(())
    }

    fn binary_level(
        &mut self,
        ops: &[(Tok, Option<BinaryOp>)],
        next: fn(&mut Self) -> Result<PExpr, StepError>,
    ) -> Result<PExpr, StepError> {
        let mut lhs = next(self)?;
        while let Some(t) = self.peek() {
            let Some((_, op)) = ops.iter().find(|(tok, _)| *tok == t.tok) else { break };
            let op_span = t.span;
            self.pos += 1;
            let rhs = next(self)?;
            let span = lhs.span.join(rhs.span);
            let kind = match op {
                Some(op) => PKind::Binary(*op, op_span, Box::new(lhs), Box::new(rhs)),
                None => PKind::MatMul(op_span, Box::new(lhs), Box::new(rhs)),
            };
            lhs = self.node(kind, span)?;
        }
        Ok(lhs)
    }

    /// A sum, or one comparison of two sums (comparisons do not chain: `a < b < c` is an
    /// error, not `(a < b) < c`).
    fn expr(&mut self) -> Result<PExpr, StepError> {
        let lhs = self.sum()?;
        let Some((op, op_span)) = self.peek().and_then(|t| comparison(&t.tok).map(|op| (op, t.span))) else {
            return Ok(lhs);
        };
        self.pos += 1;
        let rhs = self.sum()?;
        if let Some(t) = self.peek().filter(|t| comparison(&t.tok).is_some()) {
            return Err(StepError::new(
                t.span,
                "comparisons do not chain",
                "a second comparison",
                "write each comparison separately and combine them, e.g. (a < b) * (b < c)",
            ));
        }
        let span = lhs.span.join(rhs.span);
        self.node(PKind::Binary(op, op_span, Box::new(lhs), Box::new(rhs)), span)
    }

    fn sum(&mut self) -> Result<PExpr, StepError> {
        self.binary_level(&[(Tok::Plus, Some(BinaryOp::Add)), (Tok::Minus, Some(BinaryOp::Sub))], Self::term)
    }

    fn term(&mut self) -> Result<PExpr, StepError> {
        self.binary_level(&[(Tok::Star, Some(BinaryOp::Mul)), (Tok::Slash, Some(BinaryOp::Div))], Self::matmul)
    }

    fn matmul(&mut self) -> Result<PExpr, StepError> {
        self.binary_level(&[(Tok::At, None)], Self::unary)
    }

    fn unary(&mut self) -> Result<PExpr, StepError> {
        if let Some(t) = self.peek().filter(|t| t.tok == Tok::Minus) {
            let minus = t.span;
            self.pos += 1;
            self.enter(minus)?;
            let operand = self.unary()?;
            self.nesting -= 1;
            let span = minus.join(operand.span);
            return self.node(PKind::Neg(Box::new(operand)), span);
        }
        self.postfix()
    }

    fn postfix(&mut self) -> Result<PExpr, StepError> {
        let mut e = self.primary()?;
        while let Some(t) = self.peek().filter(|t| t.tok == Tok::Transpose) {
            let t_span = t.span;
            self.pos += 1;
            let span = e.span.join(t_span);
            e = self.node(PKind::Transpose(Box::new(e), t_span), span)?;
        }
        Ok(e)
    }

    fn primary(&mut self) -> Result<PExpr, StepError> {
        let (span, found) = self.found();
        match self.peek_tok().cloned() {
            Some(Tok::Num(v)) => {
                self.pos += 1;
                self.node(PKind::Num(v), span)
            }
            Some(Tok::Ident(name)) => {
                self.pos += 1;
                if self.peek_tok() == Some(&Tok::LParen) {
                    self.call(name, span)
                } else {
                    self.node(PKind::Name(name), span)
                }
            }
            Some(Tok::LParen) => {
                self.pos += 1;
                self.enter(span)?;
                let mut inner = self.expr()?;
                self.nesting -= 1;
                let close = self.expect_close("to close this parenthesis")?;
                inner.span = span.join(close);
                Ok(inner)
            }
            tok => {
                let help = match (tok, self.pos.checked_sub(1).and_then(|i| self.toks.get(i)).map(|t| &t.tok)) {
                    (Some(Tok::Star), Some(Tok::Star)) => "for a power write pow(a, b)",
                    (None, _) => {
                        "an operand is missing at the end; a statement continues on the next line only while a \
                         parenthesis is open"
                    }
                    _ => {
                        "an operand is missing here: a number, a name, a call like exp(x) or a parenthesized expression"
                    }
                };
                Err(StepError::new(span, format!("expected an expression, found {found}"), "expected an operand", help))
            }
        }
    }

    fn expect_close(&mut self, what: &str) -> Result<Span, StepError> {
        if let Some(t) = self.peek().filter(|t| t.tok == Tok::RParen) {
            let s = t.span;
            self.pos += 1;
            return Ok(s);
        }
        let (span, found) = self.found();
        Err(StepError::new(
            span,
            format!("expected `)` {what}, found {found}"),
            "expected `)` or an operator",
            "write an operator (+ - * / @) between two operands, or close the parenthesis",
        ))
    }

    fn call(&mut self, name: String, name_span: Span) -> Result<PExpr, StepError> {
        let open = self.peek().map_or(name_span, |t| t.span);
        self.pos += 1; // the `(`
        self.enter(open)?;
        let mut args = Vec::new();
        if self.peek_tok() != Some(&Tok::RParen) {
            loop {
                args.push(self.expr()?);
                if self.peek_tok() == Some(&Tok::Comma) {
                    self.pos += 1;
                    continue;
                }
                if self.peek_tok() == Some(&Tok::RParen) {
                    break;
                }
                let (span, found) = self.found();
                return Err(StepError::new(
                    span,
                    format!("expected `,` or `)` in the arguments of `{name}`, found {found}"),
                    "expected `,` or `)`",
                    "separate arguments with commas and close the call with `)`",
                ));
            }
        }
        self.nesting -= 1;
        let close = self.expect_close("to close the call")?;
        self.node(PKind::Call { name, name_span, args }, name_span.join(close))
    }
}
