//! Checking: typing a parsed rule into an [`ast::Rule`](crate::ast::Rule).
//!
//! [`parse_rule`] runs the whole front end: the TOML part ([`parse::read_rule_file`]), the
//! step's syntax ([`parse::parse_step`]), then names and types statement by statement, and last
//! the whole-rule checks (`o` and `S` assigned, every input used). The first error found is
//! returned as one [`Diagnostic`].

// `Diagnostic` is the error type of the public entry points (a fixed API); boxing it inside
// this module alone would buy nothing.
#![allow(clippy::result_large_err)]

use crate::ast::{BinaryOp, Expr, ExprKind, Input, Local, Rule, Span, StateDecl, Stmt, Target, Ty, UnaryOp};
use crate::diag::{line_col, Diagnostic};
use crate::parse::{self, PExpr, PKind, PStmt, Reporter, StepText, FUNCTIONS};
use std::collections::HashMap;
use std::path::Path;

/// Reads, parses and checks a rule file.
pub fn load_rule(path: &Path) -> Result<Rule, Diagnostic> {
    let shown = path.display().to_string();
    let source = std::fs::read_to_string(path)
        .map_err(|e| Diagnostic::error(&shown, "", Default::default(), format!("cannot read rule file: {e}")))?;
    parse_rule(&shown, &source)
}

/// Parses and checks rule-file text; `path` is only used in diagnostics.
pub fn parse_rule(path: &str, source: &str) -> Result<Rule, Diagnostic> {
    let file = parse::read_rule_file(path, source)?;
    let pstmts = parse::parse_step(path, source, &file.step)?;
    let inputs: Vec<Input> = file
        .inputs
        .iter()
        .map(|d| Input { name: d.name.clone(), ty: d.ty, per_head: d.per_head, domain: d.domain, span: d.span })
        .collect();
    let states: Vec<StateDecl> =
        file.states.iter().map(|s| StateDecl { name: s.name.clone(), ty: s.ty, span: s.span }).collect();
    let mut cx = Checker {
        r: Reporter { path, source },
        states: &states,
        step: &file.step,
        inputs: &inputs,
        used: vec![false; inputs.len()],
        locals: Vec::new(),
        input_index: inputs.iter().enumerate().map(|(i, x)| (x.name.clone(), i)).collect(),
        local_index: HashMap::new(),
        first_assignment: HashMap::new(),
        current_stmt: Span::default(),
    };
    for s in &pstmts {
        cx.first_assignment.entry(s.target.clone()).or_insert(s.target_span);
    }
    let mut stmts = Vec::with_capacity(pstmts.len());
    for s in &pstmts {
        stmts.push(cx.stmt(s)?);
    }
    cx.finish(&stmts, &file.inputs)?;
    cx.finish_states(&stmts, &file.states)?;
    let locals = cx.locals;
    Ok(Rule {
        name: file.name,
        summary: file.summary,
        inputs,
        locals,
        states,
        stmts,
        require_chunked: file.chunked,
        chunked_span: file.chunked_span,
        path: path.to_string(),
        source: source.to_string(),
    })
}

struct Checker<'a> {
    r: Reporter<'a>,
    states: &'a [StateDecl],
    step: &'a StepText,
    inputs: &'a [Input],
    used: Vec<bool>,
    locals: Vec<Local>,
    input_index: HashMap<String, usize>,
    local_index: HashMap<String, usize>,
    /// Where each assigned name is first assigned (span in the step text).
    first_assignment: HashMap<String, Span>,
    /// The statement being checked (span in the step text).
    current_stmt: Span,
}

const MATT_HELP: &str =
    "a transposed matrix can only be the left operand of `@`, as in S^T @ q; drop the ^T or use it that way";

/// Result type of `+ - * / pow` on two operand types (neither `MatT`), or None.
fn broadcast(a: Ty, b: Ty) -> Option<Ty> {
    match (a, b) {
        _ if a == b => Some(a),
        (Ty::Scalar, t) | (t, Ty::Scalar) => Some(t),
        (Ty::VecK | Ty::VecV, Ty::Mat) | (Ty::Mat, Ty::VecK | Ty::VecV) => Some(Ty::Mat),
        _ => None,
    }
}

fn matmul_type(a: Ty, b: Ty) -> Option<Ty> {
    match (a, b) {
        (Ty::Mat, Ty::VecV) => Some(Ty::VecK),
        (Ty::MatT, Ty::VecK) => Some(Ty::VecV),
        (Ty::VecK, Ty::Mat) => Some(Ty::VecV),
        (Ty::VecV, Ty::MatT) => Some(Ty::VecK),
        (Ty::VecK, Ty::VecK) | (Ty::VecV, Ty::VecV) => Some(Ty::Scalar),
        _ => None,
    }
}

fn is_vector(t: Ty) -> bool {
    matches!(t, Ty::VecK | Ty::VecV)
}

/// `a scalar`, `a [K] vector`, `a [K, V] matrix`, ...
fn a_ty(t: Ty) -> String {
    match t {
        Ty::Scalar => "a scalar".to_string(),
        Ty::VecK | Ty::VecV => format!("a {t} vector"),
        Ty::Mat | Ty::MatT => format!("a {t}"),
    }
}

/// `text` as an operand of a postfix operator: parenthesized unless it is a name.
fn operand(text: &str) -> String {
    if parse::is_identifier(text) {
        text.to_string()
    } else {
        format!("({text})")
    }
}

fn unary_fn(name: &str) -> Option<UnaryOp> {
    Some(match name {
        "exp" => UnaryOp::Exp,
        "exp2" => UnaryOp::Exp2,
        "log" => UnaryOp::Log,
        "sigmoid" => UnaryOp::Sigmoid,
        "softplus" => UnaryOp::Softplus,
        "silu" => UnaryOp::Silu,
        "sqrt" => UnaryOp::Sqrt,
        "abs" => UnaryOp::Abs,
        "tanh" => UnaryOp::Tanh,
        _ => return None,
    })
}

/// Levenshtein distance, for "did you mean".
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for j in 0..b.len() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != b[j])).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

fn did_you_mean<'n>(name: &str, candidates: impl IntoIterator<Item = &'n str>) -> Option<&'n str> {
    let limit = if name.chars().count() <= 2 { 1 } else { 2 };
    candidates
        .into_iter()
        .map(|c| (distance(name, c), c))
        .filter(|&(d, _)| d <= limit)
        .min_by_key(|&(d, _)| d)
        .map(|(_, c)| c)
}

impl Checker<'_> {
    fn text(&self, local: Span) -> &str {
        self.step.text.get(local.start..local.end).unwrap_or("")
    }

    fn span(&self, local: Span) -> Span {
        self.step.file_span(local)
    }

    fn err(
        &self,
        local: Span,
        message: impl Into<String>,
        label: impl Into<String>,
        help: impl Into<String>,
    ) -> Diagnostic {
        self.r.error(self.span(local), message, label, help)
    }

    fn line_of(&self, local: Span) -> usize {
        line_col(self.r.source, self.span(local).start).0
    }

    /// The error for a `MatT` value used other than as the left operand of `@`.
    fn matt_misuse(&self, at: &PExpr, context: &str, help: &str) -> Diagnostic {
        self.err(
            at.span,
            format!("`{}` is a transposed matrix, used {context}", self.text(at.span)),
            "a [V, K] matrix",
            help,
        )
    }

    fn stmt(&mut self, s: &PStmt) -> Result<Stmt, Diagnostic> {
        self.current_stmt = s.span;
        let name = s.target.as_str();
        let target_kind = match name {
            "S" => Some(Target::State),
            "o" => Some(Target::Output),
            _ => self.states.iter().position(|x| x.name == name).map(Target::Extra),
        };
        if target_kind.is_none() {
            if parse::is_reserved(name) {
                return Err(self.err(
                    s.target_span,
                    format!("cannot assign to the built-in `{name}`"),
                    "reserved name",
                    format!(
                        "assign to S, o or a local with another name; scale, head and the functions ({}) are reserved",
                        FUNCTIONS.join(", ")
                    ),
                ));
            }
            if self.input_index.contains_key(name) {
                return Err(self.err(
                    s.target_span,
                    format!("local `{name}` would shadow the input `{name}`"),
                    "an input has this name",
                    "inputs cannot be reassigned; give the local another name",
                ));
            }
        }
        let value = self.expr(&s.value)?;
        let span = self.span(s.span);
        let target = match target_kind {
            Some(t) => {
                let extra_example;
                let (want, example) = match t {
                    Target::State => (Ty::Mat, "S = S + outer(k, v)"),
                    Target::Extra(i) => {
                        let st = &self.states[i];
                        let x = if st.ty == Ty::VecK { "k" } else { "v" };
                        extra_example = format!("{0} = {0} + {x}", st.name);
                        (st.ty, extra_example.as_str())
                    }
                    _ => (Ty::VecV, "o = S^T @ q"),
                };
                if value.ty == Ty::MatT {
                    return Err(self.matt_misuse(&s.value, &format!("as the value of `{name}`"), MATT_HELP));
                }
                if value.ty != want {
                    return Err(self.err(
                        s.value.span,
                        format!("`{name}` must be assigned {}, found {}", a_ty(want), a_ty(value.ty)),
                        format!("{}", value.ty),
                        format!("`{name}` is {}, as in {example}", a_ty(want)),
                    ));
                }
                t
            }
            None => {
                if value.ty == Ty::MatT {
                    return Err(self.matt_misuse(&s.value, &format!("as the value of `{name}`"), MATT_HELP));
                }
                match self.local_index.get(name).copied() {
                    Some(i) => {
                        let old = self.locals[i].ty;
                        if old != value.ty {
                            return Err(self.err(
                                s.value.span,
                                format!("local `{name}` changes type: it was {}, here it is {}", a_ty(old), a_ty(value.ty)),
                                format!("{}", value.ty),
                                format!(
                                    "a local keeps the type of its first assignment (line {}); use a new name for this value",
                                    line_col(self.r.source, self.locals[i].span.start).0
                                ),
                            ));
                        }
                        Target::Local(i)
                    }
                    None => {
                        self.locals.push(Local {
                            name: name.to_string(),
                            ty: value.ty,
                            span: self.span(s.target_span),
                        });
                        self.local_index.insert(name.to_string(), self.locals.len() - 1);
                        Target::Local(self.locals.len() - 1)
                    }
                }
            }
        };
        Ok(Stmt { target, value, span })
    }

    fn expr(&mut self, p: &PExpr) -> Result<Expr, Diagnostic> {
        let span = self.span(p.span);
        match &p.kind {
            PKind::Num(v) => Ok(Expr::new(ExprKind::Num(*v), Ty::Scalar, span)),
            PKind::Name(name) => self.name(name, p.span),
            PKind::Neg(a) => {
                let x = self.expr(a)?;
                if x.ty == Ty::MatT {
                    return Err(self.matt_misuse(
                        a,
                        "under a unary minus",
                        "`-S^T @ q` reads as (-S^T) @ q; write -(S^T @ q) instead",
                    ));
                }
                let ty = x.ty;
                Ok(Expr::new(ExprKind::Unary(UnaryOp::Neg, Box::new(x)), ty, span))
            }
            PKind::Binary(op, op_span, a, b) => {
                let x = self.expr(a)?;
                let y = self.expr(b)?;
                let ty = self.elementwise(op.symbol(), *op_span, p, (a, x.ty), (b, y.ty))?;
                Ok(Expr::new(ExprKind::Binary(*op, Box::new(x), Box::new(y)), ty, span))
            }
            PKind::MatMul(op_span, a, b) => {
                let x = self.expr(a)?;
                let y = self.expr(b)?;
                match matmul_type(x.ty, y.ty) {
                    Some(ty) => Ok(Expr::new(ExprKind::MatMul(Box::new(x), Box::new(y)), ty, span)),
                    None => Err(self.matmul_error(*op_span, (a, x.ty), (b, y.ty))),
                }
            }
            PKind::Transpose(a, _) => {
                let x = self.expr(a)?;
                match x.ty {
                    Ty::Mat => Ok(Expr::new(ExprKind::Transpose(Box::new(x)), Ty::MatT, span)),
                    // `(M^T)^T` is M again; on a vector `^T` changes nothing.
                    Ty::MatT => match x.kind {
                        ExprKind::Transpose(inner) => Ok(Expr { span, ..*inner }),
                        kind => {
                            Ok(Expr::new(ExprKind::Transpose(Box::new(Expr::new(kind, x.ty, x.span))), Ty::Mat, span))
                        }
                    },
                    Ty::VecK | Ty::VecV => Ok(Expr { span, ..x }),
                    Ty::Scalar => Err(self.err(
                        p.span,
                        format!("cannot transpose the scalar `{}`", self.text(a.span)),
                        "`^T` on a scalar",
                        "`^T` transposes the state matrix (and does nothing to vectors); remove it here",
                    )),
                }
            }
            PKind::Call { name, name_span, args } => self.call(p, name, *name_span, args),
        }
    }

    fn name(&mut self, name: &str, at: Span) -> Result<Expr, Diagnostic> {
        let span = self.span(at);
        match name {
            "S" => return Ok(Expr::new(ExprKind::State, Ty::Mat, span)),
            _ if self.states.iter().any(|s| s.name == name) => {
                let i = self.states.iter().position(|s| s.name == name).unwrap_or_default();
                return Ok(Expr::new(ExprKind::Extra(i), self.states[i].ty, span));
            }
            "scale" => return Ok(Expr::new(ExprKind::Scale, Ty::Scalar, span)),
            "head" => return Ok(Expr::new(ExprKind::Head, Ty::Scalar, span)),
            "o" => {
                return Err(self.err(
                    at,
                    "the output `o` cannot be read",
                    "`o` is write-only",
                    "compute the value into a local (y = ...), use y here, and assign o = y",
                ));
            }
            _ => {}
        }
        if let Some(&i) = self.input_index.get(name) {
            self.used[i] = true;
            return Ok(Expr::new(ExprKind::Input(i), self.inputs[i].ty, span));
        }
        if let Some(&i) = self.local_index.get(name) {
            return Ok(Expr::new(ExprKind::Local(i), self.locals[i].ty, span));
        }
        if FUNCTIONS.contains(&name) {
            return Err(self.err(
                at,
                format!("`{name}` is a function, not a value"),
                "function without arguments",
                format!("call it with parentheses, e.g. {name}(x)"),
            ));
        }
        if let Some(&first) = self.first_assignment.get(name) {
            let label = if first.start == self.current_stmt.start {
                "first assigned by this statement".to_string()
            } else {
                format!("first assigned on line {}", self.line_of(first))
            };
            return Err(self.err(
                at,
                format!("local `{name}` is used before it is assigned"),
                label,
                format!("assign `{name}` in an earlier statement, or move its assignment above this one"),
            ));
        }
        let inputs: Vec<&str> = self.inputs.iter().map(|i| i.name.as_str()).collect();
        let locals: Vec<&str> = self.locals.iter().map(|l| l.name.as_str()).collect();
        let mut help = String::new();
        let all = inputs.iter().chain(locals.iter()).copied().chain(["S", "scale", "head"]);
        if let Some(guess) = did_you_mean(name, all) {
            help.push_str(&format!("did you mean `{guess}`? "));
        }
        help.push_str(&format!("the inputs are {}", inputs.join(", ")));
        if !locals.is_empty() {
            help.push_str(&format!("; the locals so far are {}", locals.join(", ")));
        }
        help.push_str("; the built-ins are S, scale and head");
        Err(self.err(at, format!("unknown name `{name}`"), "not an input, a local or a built-in", help))
    }

    /// Types `+ - * /`, the comparisons, and the elementwise functions (`pow`, `min`, ...).
    fn elementwise(
        &self,
        op: &str,
        op_span: Span,
        whole: &PExpr,
        (a, ta): (&PExpr, Ty),
        (b, tb): (&PExpr, Ty),
    ) -> Result<Ty, Diagnostic> {
        let is_call = parse::is_identifier(op);
        let context = if is_call { format!("as an argument of `{op}`") } else { format!("as an operand of `{op}`") };
        for (e, t) in [(a, ta), (b, tb)] {
            if t == Ty::MatT {
                return Err(self.matt_misuse(e, &context, MATT_HELP));
            }
        }
        if let Some(t) = broadcast(ta, tb) {
            return Ok(t);
        }
        // Only [K] with [V] is left.
        if is_call && op != "pow" {
            return Err(self.err(
                whole.span,
                format!("type mismatch in `{op}`: {} and {}", a_ty(ta), a_ty(tb)),
                format!("{op}({ta}, {tb})"),
                format!(
                    "the arguments of `{op}` combine elementwise: vectors of one kind ([K] or [V]), a scalar with \
                     either; `{}` is {} and `{}` is {}",
                    self.text(a.span),
                    a_ty(ta),
                    self.text(b.span),
                    a_ty(tb)
                ),
            ));
        }
        let (k, v) = if ta == Ty::VecK { (a, b) } else { (b, a) };
        let shown = if is_call { format!("{op}({ta}, {tb})") } else { format!("{ta} {op} {tb}") };
        let at = if is_call { whole.span } else { op_span };
        Err(self.err(
            at,
            format!("type mismatch in `{op}`: {} and {}", a_ty(ta), a_ty(tb)),
            shown,
            format!(
                "elementwise operations need two vectors of the same kind, or a scalar; did you mean outer({}, {})?",
                self.text(k.span),
                self.text(v.span)
            ),
        ))
    }

    fn matmul_error(&self, op_span: Span, (a, ta): (&PExpr, Ty), (b, tb): (&PExpr, Ty)) -> Diagnostic {
        let (ka, kb) = (self.text(a.span), self.text(b.span));
        let help = if ta == Ty::Scalar || tb == Ty::Scalar {
            "`@` is the matrix product; to scale by a scalar use `*`".to_string()
        } else {
            match ta {
                Ty::Mat => {
                    let mut h =
                        "with a [K, V] matrix on the left, `@` takes a [V] vector (giving a [K] vector)".to_string();
                    if tb == Ty::VecK {
                        h.push_str(&format!(
                            "; to multiply by a [K] vector transpose the matrix: {}^T @ {kb}",
                            operand(ka)
                        ));
                    }
                    h
                }
                Ty::MatT => {
                    let mut h =
                        "with a [V, K] matrix on the left, `@` takes a [K] vector (giving a [V] vector)".to_string();
                    if tb == Ty::VecV {
                        h.push_str("; to multiply by a [V] vector drop the ^T");
                    }
                    h
                }
                Ty::VecK => {
                    let mut h =
                        "with a [K] vector on the left, `@` takes a [K, V] matrix (giving a [V] vector) or a [K] \
                                 vector (giving a scalar)"
                            .to_string();
                    if tb == Ty::VecV {
                        h.push_str(&format!("; for the outer product write outer({ka}, {kb})"));
                    }
                    h
                }
                _ => {
                    let mut h =
                        "with a [V] vector on the left, `@` takes a [V, K] matrix (giving a [K] vector) or a [V] \
                                 vector (giving a scalar)"
                            .to_string();
                    if tb == Ty::VecK {
                        h.push_str(&format!("; for the outer product write outer({kb}, {ka})"));
                    }
                    h
                }
            }
        };
        self.err(op_span, format!("type mismatch in `@`: {} @ {}", a_ty(ta), a_ty(tb)), format!("{ta} @ {tb}"), help)
    }

    fn call(&mut self, p: &PExpr, name: &str, name_span: Span, args: &[PExpr]) -> Result<Expr, Diagnostic> {
        let span = self.span(p.span);
        let (arity, usage) = match name {
            _ if unary_fn(name).is_some() => (1, format!("{name}(x)")),
            "l2norm" | "sum" | "relu" => (1, format!("{name}(x)")),
            "pow" | "dot" | "outer" | "min" | "max" => (2, format!("{name}(a, b)")),
            "clip" => (3, "clip(x, lo, hi)".to_string()),
            "where" => (3, "where(condition, a, b)".to_string()),
            _ => {
                let mut help = String::new();
                if let Some(guess) = did_you_mean(name, FUNCTIONS) {
                    help.push_str(&format!("did you mean `{guess}`? "));
                }
                help.push_str(&format!("the functions are {}", FUNCTIONS.join(", ")));
                let label = if self.input_index.contains_key(name) || self.local_index.contains_key(name) {
                    "a value, not a function"
                } else {
                    "not a function"
                };
                return Err(self.err(name_span, format!("unknown function `{name}`"), label, help));
            }
        };
        if args.len() != arity {
            let plural = if arity == 1 { "argument" } else { "arguments" };
            return Err(self.err(
                p.span,
                format!("`{name}` takes {arity} {plural}, found {}", args.len()),
                format!("{} given", args.len()),
                format!("call it as {usage}"),
            ));
        }
        let mut typed = Vec::with_capacity(args.len());
        for a in args {
            typed.push(self.expr(a)?);
        }
        if name != "pow" {
            for (a, x) in args.iter().zip(&typed) {
                if x.ty == Ty::MatT {
                    return Err(self.matt_misuse(a, &format!("as an argument of `{name}`"), MATT_HELP));
                }
            }
        }
        if matches!(name, "relu" | "min" | "max" | "clip" | "where") {
            return self.piecewise(p, name, args, typed);
        }
        let mut it = typed.into_iter();
        let (Some(x), y) = (it.next(), it.next()) else {
            // Unreachable: the arity was checked above.
            return Err(self.err(
                p.span,
                format!("`{name}` takes {arity} arguments"),
                "",
                format!("call it as {usage}"),
            ));
        };
        if let Some(op) = unary_fn(name) {
            let ty = x.ty;
            return Ok(Expr::new(ExprKind::Unary(op, Box::new(x)), ty, span));
        }
        let bad_arg = |i: usize, found: Ty, want: &str, help: String| {
            self.err(args[i].span, format!("`{name}` needs {want}, found {}", a_ty(found)), format!("{found}"), help)
        };
        match (name, y) {
            ("l2norm" | "sum", _) => {
                if !is_vector(x.ty) {
                    let help = if name == "sum" {
                        "sum(x) adds up the entries of a [K] or [V] vector".to_string()
                    } else {
                        "l2norm(x) normalizes a [K] or [V] vector".to_string()
                    };
                    return Err(bad_arg(0, x.ty, "a [K] or [V] vector", help));
                }
                if name == "sum" {
                    Ok(Expr::new(ExprKind::Sum(Box::new(x)), Ty::Scalar, span))
                } else {
                    let ty = x.ty;
                    Ok(Expr::new(ExprKind::L2Norm(Box::new(x)), ty, span))
                }
            }
            ("pow", Some(y)) => {
                let ty = self.elementwise("pow", name_span, p, (&args[0], x.ty), (&args[1], y.ty))?;
                Ok(Expr::new(ExprKind::Binary(BinaryOp::Pow, Box::new(x), Box::new(y)), ty, span))
            }
            ("dot", Some(y)) => {
                let help = format!(
                    "dot(a, b) takes two [K] vectors or two [V] vectors{}",
                    if is_vector(x.ty) && is_vector(y.ty) {
                        "; for a [K] and a [V] vector use outer(a, b)"
                    } else {
                        ""
                    }
                );
                if !is_vector(x.ty) {
                    return Err(bad_arg(0, x.ty, "two vectors of the same kind", help));
                }
                if y.ty != x.ty {
                    return Err(bad_arg(1, y.ty, &format!("{} like its first argument", a_ty(x.ty)), help));
                }
                Ok(Expr::new(ExprKind::Dot(Box::new(x), Box::new(y)), Ty::Scalar, span))
            }
            ("outer", Some(y)) => {
                if x.ty == Ty::VecV && y.ty == Ty::VecK {
                    return Err(self.err(
                        p.span,
                        "`outer` takes the [K] vector first, found [V] and [K]",
                        "[V] x [K]",
                        format!("swap the arguments: outer({}, {})", self.text(args[1].span), self.text(args[0].span)),
                    ));
                }
                let help = "outer(a, b) takes a [K] vector and a [V] vector and gives a [K, V] matrix".to_string();
                if x.ty != Ty::VecK {
                    return Err(bad_arg(0, x.ty, "a [K] vector as its first argument", help));
                }
                if y.ty != Ty::VecV {
                    return Err(bad_arg(1, y.ty, "a [V] vector as its second argument", help));
                }
                Ok(Expr::new(ExprKind::Outer(Box::new(x), Box::new(y)), Ty::Mat, span))
            }
            _ => Err(self.err(p.span, format!("`{name}` takes {arity} arguments"), "", format!("call it as {usage}"))),
        }
    }

    /// Types `relu`, `min`, `max`, `clip` and `where`, written with the elementwise binary
    /// operators (see [`BinaryOp`]); every argument broadcasts as in `+`.
    fn piecewise(&self, p: &PExpr, name: &str, args: &[PExpr], typed: Vec<Expr>) -> Result<Expr, Diagnostic> {
        let span = self.span(p.span);
        // The result type of all the arguments together, checked pairwise from the first.
        let mut ty = typed[0].ty;
        for (a, x) in args.iter().zip(&typed).skip(1) {
            ty = self.elementwise(name, a.span, p, (&args[0], ty), (a, x.ty))?;
        }
        let bin = |op: BinaryOp, a: Expr, b: Expr| {
            let ty = broadcast(a.ty, b.ty).unwrap_or(ty);
            Expr::new(ExprKind::Binary(op, Box::new(a), Box::new(b)), ty, span)
        };
        let zero = Expr::new(ExprKind::Num(0.0), Ty::Scalar, span);
        let mut it = typed.into_iter();
        let mut next = || it.next().unwrap_or_else(|| zero.clone());
        Ok(match name {
            "relu" => bin(BinaryOp::Max, next(), zero.clone()),
            "min" => bin(BinaryOp::Min, next(), next()),
            "max" => bin(BinaryOp::Max, next(), next()),
            "clip" => {
                let (x, lo, hi) = (next(), next(), next());
                bin(BinaryOp::Min, bin(BinaryOp::Max, x, lo), hi)
            }
            _ => {
                let (c, a, b) = (next(), next(), next());
                let not_c = bin(BinaryOp::Equal, c.clone(), zero.clone());
                bin(BinaryOp::Add, bin(BinaryOp::Keep, c, a), bin(BinaryOp::Keep, not_c, b))
            }
        })
    }

    /// Every declared state must be updated by the step (a state nothing writes is a
    /// constant, better passed as an input).
    fn finish_states(&self, stmts: &[Stmt], decls: &[parse::StateEntry]) -> Result<(), Diagnostic> {
        for (i, d) in decls.iter().enumerate() {
            if !stmts.iter().any(|s| s.target == Target::Extra(i)) {
                return Err(self.r.error(
                    d.name_span,
                    format!("state `{}` is never updated", d.name),
                    "declared here",
                    format!("add a statement `{0} = ...` to the step, or remove `{0}` from [states]", d.name),
                ));
            }
        }
        Ok(())
    }

    /// Whole-rule checks after the last statement.
    fn finish(&self, stmts: &[Stmt], decls: &[parse::InputDecl]) -> Result<(), Diagnostic> {
        let key = self.step.key_span;
        if !stmts.iter().any(|s| s.target == Target::Output) {
            return Err(self.r.error(
                key,
                "the step never assigns the output `o`",
                "no `o = ...` in this step",
                "add a statement `o = ...` that computes the [V] output, e.g. o = scale * S^T @ q",
            ));
        }
        if !stmts.iter().any(|s| s.target == Target::State) {
            return Err(self.r.error(
                key,
                "the step never updates the state `S`",
                "no `S = ...` in this step",
                "add a statement `S = ...` that computes the new [K, V] state, e.g. S = S + outer(k, v)",
            ));
        }
        for (d, used) in decls.iter().zip(&self.used) {
            if !used {
                return Err(self.r.error(
                    d.name_span,
                    format!("input `{}` is never used", d.name),
                    "declared here",
                    format!("remove `{}` from [inputs], or use it in the step", d.name),
                ));
            }
        }
        Ok(())
    }
}
