//! The canonical form: a checked rule rewritten as DESIGN.md's
//! `S_t = (diag(w_t) + sum_r a_r b_r^T) S_{t-1} + sum_j kw_j vw_j^T`, `o_t = S^T q_t (+ terms)`,
//! and its class.
//!
//! The step is evaluated symbolically: each value is either free of the state (an expression
//! of the token's inputs, the *prologue*) or linear in it, kept in a structured form
//! ([`LinMat`], [`LinVec`]). Anything else (a product of two state-dependent values, a
//! function of the state, ...) becomes [`Sym::Opaque`] with the span that caused it: such a
//! rule still runs token by token, and the reason is what the user sees.

use crate::ast::*;
use crate::diag::Diagnostic;
use std::fmt::Write as _;

/// Recurrence classes, from cheapest chunked algorithm to the most general.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// A = I (linear attention).
    Additive,
    /// A = gamma I with gamma fixed per head (RetNet).
    Decayed,
    /// A = alpha_t I, data-dependent (Mamba-2, simple GLA).
    GatedScalar,
    /// A = diag(alpha_t) (GLA, RWKV-6, HGRN-2).
    GatedVector,
    /// A = diag(w_t) + low rank (DeltaNet, Gated DeltaNet, KDA, RWKV-7).
    Delta { rank: usize, vector_gate: bool },
    /// `S_t = A_t S_(t-1) D_t + ...` with D_t = diag(d_t) a value-side gate and A_t the
    /// key side's: I, alpha_t I or diag(alpha_t) (two-sided).
    GatedValue { key_gate: KeyGate },
}

/// The key-side gate next to a value-side one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyGate {
    None,
    Scalar,
    Vector,
}

impl Class {
    pub fn describe(&self) -> String {
        match self {
            Class::Additive => "additive (A = I)".into(),
            Class::Decayed => "decayed (A = gamma I, gamma fixed per head)".into(),
            Class::GatedScalar => "gated, scalar (A = alpha_t I)".into(),
            Class::GatedVector => "gated, vector (A = diag(alpha_t))".into(),
            Class::GatedValue { key_gate: KeyGate::None } => "gated, value side (S D_t, D_t = diag(d_t))".into(),
            Class::GatedValue { key_gate: KeyGate::Scalar } => {
                "gated, both sides (alpha_t S D_t, D_t = diag(d_t))".into()
            }
            Class::GatedValue { key_gate: KeyGate::Vector } => {
                "gated, both sides (A_t S D_t, A_t = diag(alpha_t), D_t = diag(d_t))".into()
            }
            Class::Delta { rank, vector_gate } => format!(
                "delta, rank {rank}, {} gate (A = {} + sum of {rank} a b^T)",
                if *vector_gate { "vector" } else { "scalar" },
                if *vector_gate { "diag(alpha_t)" } else { "alpha_t I" }
            ),
        }
    }
}

/// Which state the output reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Read {
    /// `o_t` reads `S_{t-1}` (RWKV-6).
    Before,
    /// `o_t` reads `S_t`.
    After,
}

/// `o = coef ⊙ (S^T query) + extra`, or, with an epilogue, `o = epilogue(S^T query,
/// n_1 . query, ...)`: a state-free function of reads of S and of the extra columns, all
/// through the one query (xLSTM's mLSTM divides `C^T q` by `max(|n . q|, 1)`).
#[derive(Clone, Debug, PartialEq)]
pub struct Output {
    pub read: Read,
    /// `[K]`.
    pub query: Expr,
    /// `[V]`; None means 1.
    pub coef: Option<Expr>,
    /// A state-free `[V]` term (RWKV-6's bonus, Mamba-2's D x); None means 0.
    pub extra: Option<Expr>,
    /// The output as a function of the reads ([`ExprKind::Read`]: 0 is `S^T query`, `1 + i`
    /// is column i's `n_i . query`); `coef` and `extra` are then None.
    pub epilogue: Option<Expr>,
}

/// A `[K]` state updated by S's own transition, `n_t = A_t n_(t-1) + sum_j kw_j c_j`: one
/// more column of S (value `c_j`, a scalar per token, in each write `kw_j`).
#[derive(Clone, Debug, PartialEq)]
pub struct Column {
    /// Index into [`Rule::states`].
    pub state: usize,
    /// (kw `[K]`, c scalar).
    pub writes: Vec<(Expr, Expr)>,
}

/// The canonical form of a chunkable rule. Every expression is state-free: a function of
/// the token's inputs, per-head parameters, `head` and `scale`.
#[derive(Clone, Debug, PartialEq)]
pub struct Canonical {
    pub class: Class,
    /// Natural log of the diagonal decay w (scalar or `[K]`); None when w = 1.
    pub log_gate: Option<Expr>,
    /// Natural log of the value-side decay d (`[V]`): `S_t = A_t S_(t-1) diag(d_t) + ...`;
    /// None when there is none.
    pub log_vgate: Option<Expr>,
    /// Low-rank transition terms (a, b), both `[K]`: A = diag(w) + sum a b^T.
    pub low_rank: Vec<(Expr, Expr)>,
    /// For each low-rank term, `b'` when `b = w * b'` (the decay is a factor of `b`, as in
    /// every gated delta rule: `b^T S = b'^T (diag(w) S)`), so that a chunked form can gate
    /// `b'` by the inclusive cumulative decay instead of `b` by the exclusive one: the same
    /// terms without an exponential per element of `b`.
    pub low_rank_decayed: Vec<Option<Expr>>,
    /// Writes (kw `[K]`, vw `[V]`).
    pub writes: Vec<(Expr, Expr)>,
    /// The `[K]` states that are extra columns of S, in [`Rule::states`] order.
    pub columns: Vec<Column>,
    pub output: Output,
    /// Things the user should know (e.g. a decay that is not provably positive).
    pub warnings: Vec<(Span, String)>,
}

/// Why a rule cannot be chunked, and where.
#[derive(Clone, Debug, PartialEq)]
pub struct NotChunkable {
    pub reason: String,
    pub span: Span,
}

impl NotChunkable {
    pub fn to_diagnostic(&self, rule: &Rule) -> Diagnostic {
        Diagnostic::error(&rule.path, &rule.source, self.span, format!("this rule cannot be chunked: {}", self.reason))
            .with_label("here")
            .with_help(
                "chunked kernels need a state update of the form (diag(w) + a b^T) S + outer(k, v); \
                 the recurrent kernel and the reference run any rule (remove `chunked = true` to allow that)",
            )
    }
}

/// State version a linear value refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Version {
    /// The state entering the step.
    Old,
    /// The state after the step's last update.
    New,
}

/// The state a linear value is linear in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Of {
    S,
    /// A `[K]` extra state (index into [`Rule::states`]), seen as a K x 1 column: its
    /// writes' values and its reads are scalars.
    Column(usize),
}

/// `(diag(w) + sum a b^T) S diag(d) + sum kw vw^T`.
#[derive(Clone, Debug)]
struct LinMat {
    of: Of,
    version: Version,
    w: Option<Expr>,
    low_rank: Vec<(Expr, Expr)>,
    vside: Option<Expr>,
    writes: Vec<(Expr, Expr)>,
}

impl LinMat {
    fn has_state(&self) -> bool {
        self.w.is_some() || !self.low_rank.is_empty()
    }
}

/// `sum_r coef_r ⊙ (S^T x_r) + free` (for a column state, `coef_r (n . x_r) + free`).
#[derive(Clone, Debug)]
struct LinVec {
    of: Of,
    version: Version,
    terms: Vec<(Option<Expr>, Expr)>,
    free: Option<Expr>,
}

#[derive(Clone, Debug)]
enum Sym {
    Free(Expr),
    Mat(LinMat),
    MatT(LinMat),
    Vec(LinVec),
    Opaque(String, Span),
}

/// Derives the canonical form, or says why the rule has none.
pub fn canonicalize(rule: &Rule) -> Result<Canonical, NotChunkable> {
    let mut cx = Cx {
        rule,
        locals: vec![None; rule.locals.len()],
        local_splits: vec![None; rule.locals.len()],
        extras: (0..rule.states.len()).map(|i| Sym::Mat(identity(Of::Column(i), Version::Old))).collect(),
        warnings: vec![],
    };
    let last_update = rule.stmts.iter().rposition(|s| s.target == Target::State);
    let last_extra: Vec<Option<usize>> =
        (0..rule.states.len()).map(|i| rule.stmts.iter().rposition(|s| s.target == Target::Extra(i))).collect();
    let mut state = Sym::Mat(identity(Of::S, Version::Old));
    let mut update = None;
    let mut extra_updates: Vec<Option<(Sym, Span)>> = vec![None; rule.states.len()];
    let mut output = None;
    for (i, s) in rule.stmts.iter().enumerate() {
        let val = cx.eval(&s.value, &state);
        match &s.target {
            Target::State => {
                if let Some(i_last) = last_update {
                    if i == i_last {
                        update = Some((val, s.span));
                        state = Sym::Mat(identity(Of::S, Version::New));
                        continue;
                    }
                }
                state = val;
            }
            Target::Extra(x) => {
                if last_extra[*x] == Some(i) {
                    extra_updates[*x] = Some((val, s.span));
                    cx.extras[*x] = Sym::Mat(identity(Of::Column(*x), Version::New));
                } else {
                    cx.extras[*x] = val;
                }
            }
            Target::Output => {
                let split = (!matches!(val, Sym::Free(_))).then(|| cx.split_reads(&s.value, &state));
                output = Some((val, split, s.span));
            }
            Target::Local(l) => {
                if matches!(val, Sym::Opaque(..)) {
                    cx.local_splits[*l] = Some(cx.split_reads(&s.value, &state));
                }
                cx.locals[*l] = Some(val);
            }
        }
    }
    let (update, update_span) =
        update.ok_or_else(|| NotChunkable { reason: "the step never updates S".into(), span: Span::default() })?;
    let m = match update {
        Sym::Mat(m) => m,
        Sym::Opaque(reason, span) => return Err(NotChunkable { reason, span }),
        _ => return Err(NotChunkable { reason: "the update of S is not a matrix".into(), span: update_span }),
    };
    if !m.has_state() {
        return Err(NotChunkable { reason: "the update discards the previous state".into(), span: update_span });
    }
    let m = normalized(m, update_span);
    let mut columns = vec![];
    for (i, u) in extra_updates.into_iter().enumerate() {
        let (u, span) = u.ok_or_else(|| NotChunkable {
            reason: format!("the step never updates the state `{}`", rule.states[i].name),
            span: rule.states[i].span,
        })?;
        columns.push(column(rule, &m, i, u, span)?);
    }
    let (out, split, out_span) =
        output.ok_or_else(|| NotChunkable { reason: "the step never assigns o".into(), span: Span::default() })?;
    let output = match (out, split) {
        // Linear in S: `coef ⊙ S^T q + extra`, else (two scalings of one query, say) an epilogue.
        (Sym::Vec(v), Some(split)) if v.of == Of::S => match cx.output(v, out_span) {
            Ok(o) => o,
            Err(linear) => split.and_then(|s| cx.epilogue(s, out_span)).map_err(|_| linear)?,
        },
        (Sym::Free(_), _) => {
            return Err(NotChunkable { reason: "the output never reads the state".into(), span: out_span })
        }
        (_, Some(split)) => cx.epilogue(split?, out_span)?,
        _ => return Err(NotChunkable { reason: "the output is not a [V] vector".into(), span: out_span }),
    };
    let w = m.w.clone();
    let log_gate = match &w {
        None => None,
        Some(w) if is_one(w) => None,
        Some(w) => Some(cx.log_of(w)),
    };
    let log_vgate = m.vside.as_ref().map(|d| cx.log_of(d));
    let rank = m.low_rank.len();
    let vector_gate = log_gate.as_ref().is_some_and(|g| g.ty == Ty::VecK);
    let class = if log_vgate.is_some() && rank == 0 {
        let key_gate = match &log_gate {
            None => KeyGate::None,
            Some(g) if g.ty == Ty::VecK => KeyGate::Vector,
            Some(_) => KeyGate::Scalar,
        };
        Class::GatedValue { key_gate }
    } else if rank > 0 {
        Class::Delta { rank, vector_gate }
    } else {
        match &log_gate {
            None => Class::Additive,
            Some(g) if g.ty == Ty::VecK => Class::GatedVector,
            Some(g) if !depends_on_tokens(rule, g) => Class::Decayed,
            Some(_) => Class::GatedScalar,
        }
    };
    // A zero decay (w absent but a low-rank transition present) has log = -inf: not chunkable.
    if w.is_none() {
        return Err(NotChunkable {
            reason: "the transition has no diagonal part (S is replaced by a low-rank map of itself)".into(),
            span: update_span,
        });
    }
    let low_rank_decayed = match &w {
        Some(w) => m.low_rank.iter().map(|(_, b)| without_factor(b, w)).collect(),
        None => vec![None; m.low_rank.len()],
    };
    Ok(Canonical {
        class,
        log_gate,
        log_vgate,
        low_rank: m.low_rank,
        low_rank_decayed,
        writes: m.writes,
        columns,
        output,
        warnings: cx.warnings,
    })
}

/// The identity map of a state: `S` itself, unchanged.
fn identity(of: Of, version: Version) -> LinMat {
    LinMat { of, version, w: Some(num(1.0, Span::default())), low_rank: vec![], vside: None, writes: vec![] }
}

/// `m` with the low-rank terms and the writes that share a vector merged, and each
/// low-rank term's sign chosen so that `a` is a write's key where one is (`a b^T = (-a)(-b)^T`),
/// so that the chunked forms can fold that write into the low-rank values (DeltaNet's
/// pseudo-values).
fn normalized(mut m: LinMat, sp: Span) -> LinMat {
    m.low_rank = merge_low_rank(std::mem::take(&mut m.low_rank), sp);
    m.writes = merge_low_rank(std::mem::take(&mut m.writes), sp);
    for (a, b) in &mut m.low_rank {
        let negated = |x: &Expr, y: &Expr| matches!(&x.kind, ExprKind::Unary(UnaryOp::Neg, inner) if same(inner, y));
        if m.writes.iter().any(|(kw, _)| negated(a, kw) || negated(kw, a)) {
            *a = neg(a, sp);
            *b = neg(b, sp);
        }
    }
    m
}

/// The extra state `i`'s update `u` as a column of S: it must be a `[K]` state moved by S's
/// own transition `s`.
fn column(rule: &Rule, s: &LinMat, i: usize, u: Sym, span: Span) -> Result<Column, NotChunkable> {
    let name = &rule.states[i].name;
    let m = match u {
        Sym::Mat(m) if m.of == Of::Column(i) => m,
        Sym::Opaque(reason, span) => return Err(NotChunkable { reason, span }),
        _ => return Err(NotChunkable { reason: format!("the update of `{name}` is not linear in `{name}`"), span }),
    };
    if !m.has_state() {
        return Err(NotChunkable { reason: format!("the update discards the previous `{name}`"), span });
    }
    let m = normalized(m, span);
    let pairs_match = |x: &[(Expr, Expr)], y: &[(Expr, Expr)]| {
        let mut x: Vec<_> = x.iter().map(|(a, b)| outer_signature(rule, a, b)).collect();
        let mut y: Vec<_> = y.iter().map(|(a, b)| outer_signature(rule, a, b)).collect();
        x.sort();
        y.sort();
        x == y
    };
    if s.vside.is_some() || m.vside.is_some() {
        return Err(NotChunkable {
            reason: format!(
                "an extra state next to a value-side gate is not chunked (`{name}` would need its own value gate)"
            ),
            span,
        });
    }
    if !same_opt(&s.w, &m.w) || !pairs_match(&s.low_rank, &m.low_rank) {
        return Err(NotChunkable {
            reason: format!(
                "`{name}` is not updated by S's transition (chunked kernels carry a [K] state as one more \
                 column of S, so it needs the same decay and low-rank terms as S)"
            ),
            span,
        });
    }
    let writes = m.writes.into_iter().map(|(kw, c)| (kw, Expr { ty: Ty::Scalar, ..c })).collect();
    Ok(Column { state: i, writes })
}

/// `(c, y)` with `x = c * y`, `c` the product of `x`'s scalar factors (None: 1) and `y` the
/// vector they scale.
pub fn scalar_factor(x: &Expr) -> (Option<Expr>, Expr) {
    let times = |f: Option<Expr>, g: Expr| Some(f.map_or_else(|| g.clone(), |f| mul(&g, &f, x.span)));
    match &x.kind {
        ExprKind::Binary(BinaryOp::Mul, a, b) if a.ty == Ty::Scalar && b.ty != Ty::Scalar => {
            let (f, y) = scalar_factor(b);
            (times(f, (**a).clone()), y)
        }
        ExprKind::Binary(BinaryOp::Mul, a, b) if b.ty == Ty::Scalar && a.ty != Ty::Scalar => {
            let (f, y) = scalar_factor(a);
            (times(f, (**b).clone()), y)
        }
        ExprKind::Unary(UnaryOp::Neg, a) if a.ty != Ty::Scalar => {
            let (f, y) = scalar_factor(a);
            (times(f, num(-1.0, x.span)), y)
        }
        _ => (None, x.clone()),
    }
}

/// The outer product `a b^T` in a form that does not depend on where its scalar factors and
/// signs were written: (negative, the scalar factors printed and sorted, `a`'s and `b`'s
/// vector parts printed). `-(b k) k^T` and `(b k) (-k)^T` agree.
fn outer_signature(rule: &Rule, a: &Expr, b: &Expr) -> (bool, Vec<String>, String, String) {
    fn split(rule: &Rule, x: &Expr, negative: &mut bool, factors: &mut Vec<String>) -> String {
        match &x.kind {
            ExprKind::Unary(UnaryOp::Neg, inner) => {
                *negative = !*negative;
                split(rule, inner, negative, factors)
            }
            ExprKind::Binary(BinaryOp::Mul, p, q) if p.ty == Ty::Scalar && q.ty != Ty::Scalar => {
                split(rule, p, negative, factors);
                split(rule, q, negative, factors)
            }
            ExprKind::Binary(BinaryOp::Mul, p, q) if q.ty == Ty::Scalar && p.ty != Ty::Scalar => {
                split(rule, q, negative, factors);
                split(rule, p, negative, factors)
            }
            ExprKind::Num(c) if x.ty == Ty::Scalar => {
                *negative ^= *c < 0.0;
                if c.abs() != 1.0 {
                    factors.push(format!("{}", c.abs()));
                }
                String::new()
            }
            _ if x.ty == Ty::Scalar => {
                factors.push(print_expr(rule, x));
                String::new()
            }
            _ => print_expr(rule, x),
        }
    }
    let (mut negative, mut factors) = (false, vec![]);
    let core_a = split(rule, a, &mut negative, &mut factors);
    let core_b = split(rule, b, &mut negative, &mut factors);
    factors.sort();
    (negative, factors, core_a, core_b)
}

/// A value as a function of state reads ([`ExprKind::Read`]) and the reads it makes.
type Split = (Expr, Vec<ReadSite>);

/// One read of a state in an output epilogue: which version, through which query.
#[derive(Clone, Debug)]
struct ReadSite {
    version: Version,
    query: Expr,
    span: Span,
}

/// True when `e` reads a per-token input (as opposed to per-head parameters and constants).
pub fn depends_on_tokens(rule: &Rule, e: &Expr) -> bool {
    match &e.kind {
        ExprKind::Input(i) => !rule.inputs[*i].per_head,
        _ => e.children().iter().any(|c| depends_on_tokens(rule, c)),
    }
}

struct Cx<'a> {
    rule: &'a Rule,
    locals: Vec<Option<Sym>>,
    /// For each local that is not linear in a state, its value as a function of state reads
    /// ([`Cx::split_reads`]), for an output epilogue that uses it.
    local_splits: Vec<Option<Result<Split, NotChunkable>>>,
    /// The extra states as they are at this point of the step.
    extras: Vec<Sym>,
    warnings: Vec<(Span, String)>,
}

fn opaque(what: &str, span: Span) -> Sym {
    Sym::Opaque(what.to_string(), span)
}

impl Cx<'_> {
    fn eval(&mut self, e: &Expr, state: &Sym) -> Sym {
        let sp = e.span;
        match &e.kind {
            ExprKind::Num(_) | ExprKind::Input(_) | ExprKind::Scale | ExprKind::Head => Sym::Free(e.clone()),
            ExprKind::Local(i) => {
                self.locals[*i].clone().unwrap_or_else(|| opaque("a local is read before it is assigned", sp))
            }
            ExprKind::State => state.clone(),
            ExprKind::Extra(i) if self.rule.states[*i].ty == Ty::VecV => Sym::Opaque(
                format!(
                    "the [V] state `{}` is not chunked (only [K] states are: as extra columns of S)",
                    self.rule.states[*i].name
                ),
                sp,
            ),
            ExprKind::Extra(i) => self.extras[*i].clone(),
            ExprKind::Read(_) => opaque("a canonical read inside a rule", sp),
            ExprKind::Unary(op, a) => match self.eval(a, state) {
                Sym::Free(x) => Sym::Free(rebuild1(e, x)),
                s @ Sym::Opaque(..) => s,
                s if *op == UnaryOp::Neg => scale_sym(s, &num(-1.0, sp)),
                _ => Sym::Opaque(format!("{}(...) of a value that depends on the state is not linear", op.name()), sp),
            },
            ExprKind::Binary(op, a, b) => {
                let (x, y) = (self.eval(a, state), self.eval(b, state));
                self.binary(e, *op, x, y)
            }
            ExprKind::Dot(a, b) | ExprKind::Outer(a, b) | ExprKind::MatMul(a, b) => {
                let (x, y) = (self.eval(a, state), self.eval(b, state));
                match (x, y) {
                    // A state-free K x V matrix is kept as the write it is.
                    (Sym::Free(x), Sym::Free(y)) if matches!(e.kind, ExprKind::Outer(..)) => Sym::Mat(LinMat {
                        of: Of::S,
                        version: Version::Old,
                        w: None,
                        low_rank: vec![],
                        vside: None,
                        writes: vec![(x, y)],
                    }),
                    (Sym::Free(x), Sym::Free(y)) => Sym::Free(rebuild2(e, x, y)),
                    (s @ Sym::Opaque(..), _) | (_, s @ Sym::Opaque(..)) => s,
                    (x, y) => product(e, x, y),
                }
            }
            ExprKind::Sum(a) | ExprKind::L2Norm(a) => match self.eval(a, state) {
                Sym::Free(x) => Sym::Free(rebuild1(e, x)),
                s @ Sym::Opaque(..) => s,
                _ => opaque("a sum or norm of a value that depends on the state is not linear in it", sp),
            },
            ExprKind::Transpose(a) => match self.eval(a, state) {
                Sym::Mat(m) => Sym::MatT(m),
                Sym::MatT(m) => Sym::Mat(m),
                s => s,
            },
        }
    }

    fn binary(&mut self, e: &Expr, op: BinaryOp, x: Sym, y: Sym) -> Sym {
        let sp = e.span;
        match (op, x, y) {
            (_, Sym::Free(x), Sym::Free(y)) => Sym::Free(rebuild2(e, x, y)),
            (_, s @ Sym::Opaque(..), _) | (_, _, s @ Sym::Opaque(..)) => s,
            (BinaryOp::Add, x, y) => add_sym(x, y, sp),
            (BinaryOp::Sub, x, y) => {
                let ny = scale_sym(y, &num(-1.0, sp));
                add_sym(x, ny, sp)
            }
            (BinaryOp::Mul, Sym::Free(f), s) | (BinaryOp::Mul, s, Sym::Free(f)) => scale_sym(s, &f),
            (BinaryOp::Div, s, Sym::Free(f)) => {
                let inv = Expr::new(
                    ExprKind::Binary(BinaryOp::Div, Box::new(num(1.0, f.span)), Box::new(f.clone())),
                    f.ty,
                    f.span,
                );
                scale_sym(s, &inv)
            }
            (BinaryOp::Mul, Sym::Mat(a), Sym::Mat(b)) if !a.has_state() && !b.has_state() => {
                opaque("an elementwise product of two matrices is not a sum of outer products", sp)
            }
            // Linear in S, but a gate on every entry: not a transition (diag(w) + low rank) S.
            (BinaryOp::Mul, Sym::Mat(a), Sym::Mat(b)) if a.has_state() != b.has_state() => opaque(
                "gates each entry of the state by a [K, V] matrix (an elementwise product with S), which is \
                 not a transition of the form (diag(w) + sum a b^T) S; gate S by a scalar or a [K] vector",
                sp,
            ),
            (BinaryOp::Mul, ..) => opaque("a product of two values that both depend on the state is not linear", sp),
            (BinaryOp::Div, ..) => opaque("dividing by a value that depends on the state is not linear", sp),
            (BinaryOp::Pow, ..) => opaque("pow(...) of a value that depends on the state is not linear", sp),
            // `where(c, x, ...)` with a state-free condition masks x: a state-free 0/1 factor.
            (BinaryOp::Keep, Sym::Free(c), s) => {
                let one = num(1.0, sp);
                let ty = c.ty;
                scale_sym(s, &Expr::new(ExprKind::Binary(BinaryOp::Keep, Box::new(c), Box::new(one)), ty, sp))
            }
            (BinaryOp::Keep, ..) => {
                opaque("a `where` whose condition depends on the state is not linear (it switches on the state)", sp)
            }
            (BinaryOp::Min | BinaryOp::Max, ..) => Sym::Opaque(
                format!("{}(...) of a value that depends on the state is not linear (it is piecewise)", op.symbol()),
                sp,
            ),
            (op, ..) => Sym::Opaque(
                format!("the comparison `{}` of a value that depends on the state is not linear", op.symbol()),
                sp,
            ),
        }
    }

    /// Turns the symbolic output into `coef ⊙ (S^T query) + extra`.
    fn output(&mut self, v: LinVec, span: Span) -> Result<Output, NotChunkable> {
        let read = match v.version {
            Version::Old => Read::Before,
            Version::New => Read::After,
        };
        let mut groups: Vec<(Option<Expr>, Expr)> = vec![];
        for (coef, x) in v.terms {
            let key = coef.as_ref().map(|c| print_expr(self.rule, c));
            match groups.iter_mut().find(|(c, _)| c.as_ref().map(|c| print_expr(self.rule, c)) == key) {
                Some(g) => g.1 = add(&g.1, &x, span),
                None => groups.push((coef, x)),
            }
        }
        if groups.len() != 1 {
            return Err(NotChunkable {
                reason: "the output reads the state through two different [V] scalings".into(),
                span,
            });
        }
        let (coef, query) = groups.remove(0);
        Ok(Output { read, query, coef, extra: v.free, epilogue: None })
    }

    /// `e` (evaluated with `state` as S) as a state-free function of state reads: each
    /// maximal subexpression linear in one state becomes `coef ⊙ Read + free`, the rest is
    /// kept as written. Fails with the reason that made `e` non-linear where that is not a
    /// function of reads (a product of two reads, a state read through `S @ y`, ...).
    fn split_reads(&mut self, e: &Expr, state: &Sym) -> Result<Split, NotChunkable> {
        let reason = match self.eval(e, state) {
            Sym::Free(x) => return Ok((x, vec![])),
            Sym::Vec(v) => return Ok(self.reads_of(v, e.span)),
            Sym::Opaque(reason, span) => NotChunkable { reason, span },
            Sym::Mat(_) | Sym::MatT(_) => {
                return Err(NotChunkable { reason: "the output uses the state as a matrix".into(), span: e.span })
            }
        };
        let mut sites = vec![];
        let mut split = |cx: &mut Cx, x: &Expr| -> Result<Expr, NotChunkable> {
            let (x, s) = cx.split_reads(x, state)?;
            sites.extend(s);
            Ok(x)
        };
        let rebuilt = match &e.kind {
            ExprKind::Local(i) => return self.local_splits[*i].clone().unwrap_or(Err(reason)),
            ExprKind::Unary(_, a) | ExprKind::Sum(a) | ExprKind::L2Norm(a) => {
                let a = split(self, a)?;
                rebuild1(e, a)
            }
            ExprKind::Binary(_, a, b) | ExprKind::Dot(a, b) => {
                let (a, b) = (split(self, a)?, split(self, b)?);
                rebuild2(e, a, b)
            }
            _ => return Err(reason),
        };
        // Splitting must have found reads under the non-linear operation; else the reason
        // lies elsewhere (a product of two reads inside a dot, ...).
        if sites.is_empty() {
            return Err(reason);
        }
        Ok((rebuilt, sites))
    }

    /// A linear read as `sum_g coef_g ⊙ Read + free`, one group per distinct coefficient.
    fn reads_of(&mut self, v: LinVec, span: Span) -> (Expr, Vec<ReadSite>) {
        let mut groups: Vec<(Option<Expr>, Expr)> = vec![];
        for (coef, x) in v.terms {
            match groups.iter_mut().find(|(c, _)| same_opt(c, &coef)) {
                Some(g) => g.1 = add(&g.1, &x, span),
                None => groups.push((coef, x)),
            }
        }
        let (index, ty) = match v.of {
            Of::S => (0, Ty::VecV),
            Of::Column(i) => (1 + i, Ty::Scalar),
        };
        let placeholder = Expr::new(ExprKind::Read(index), ty, span);
        let mut sites = vec![];
        let mut sum: Option<Expr> = v.free;
        for (coef, query) in groups {
            // `S^T (scale q)` and `n . q` read through one query: a scalar factor of the
            // query moves into the epilogue.
            let (factor, query) = scalar_factor(&query);
            sites.push(ReadSite { version: v.version, query, span });
            let read = factor.map_or_else(|| placeholder.clone(), |f| mul(&f, &placeholder, span));
            let term = coef.map_or_else(|| read.clone(), |c| mul(&c, &read, span));
            sum = Some(match sum {
                Some(s) => add(&term, &s, span),
                None => term,
            });
        }
        (sum.unwrap_or_else(|| num(0.0, span)), sites)
    }

    /// The output as an epilogue over reads that share one query and one state version.
    fn epilogue(&mut self, (expr, sites): Split, span: Span) -> Result<Output, NotChunkable> {
        let Some(first) = sites.first() else {
            return Err(NotChunkable { reason: "the output never reads the state".into(), span });
        };
        let query = first.query.clone();
        for s in &sites {
            if !same(&s.query, &query) {
                return Err(NotChunkable {
                    reason: format!(
                        "the output reads the states through two different vectors (`{}` and `{}`); \
                         chunked kernels read S and its extra columns through one query",
                        print_expr(self.rule, &query),
                        print_expr(self.rule, &s.query)
                    ),
                    span: s.span,
                });
            }
            if s.version != first.version {
                return Err(NotChunkable {
                    reason: "the output reads one state before its update and another after".into(),
                    span: s.span,
                });
            }
        }
        let read = if first.version == Version::Old { Read::Before } else { Read::After };
        Ok(Output { read, query, coef: None, extra: None, epilogue: Some(expr) })
    }

    /// Natural log of a decay, simplified; warns when the decay is not provably positive.
    fn log_of(&mut self, w: &Expr) -> Expr {
        if let Some(l) = log_simplified(self.rule, w) {
            return l;
        }
        self.warnings.push((
            w.span,
            format!(
                "the decay `{}` is not provably positive: chunked kernels use its logarithm and give NaN where it is <= 0 \
                 (write it as exp(...) of a log-space gate to make this certain)",
                print_expr(self.rule, w)
            ),
        ));
        Expr::new(ExprKind::Unary(UnaryOp::Log, Box::new(w.clone())), w.ty, w.span)
    }
}

/// log(w) when w is provably positive and the log simplifies (exp, sigmoid, products,
/// positive constants, positive-domain inputs).
fn log_simplified(rule: &Rule, w: &Expr) -> Option<Expr> {
    let sp = w.span;
    match &w.kind {
        ExprKind::Num(c) if *c > 0.0 => Some(num(c.ln(), sp)),
        ExprKind::Unary(UnaryOp::Exp, x) => Some((**x).clone()),
        ExprKind::Unary(UnaryOp::Exp2, x) => Some(mul(x, &num(std::f64::consts::LN_2, sp), sp)),
        ExprKind::Unary(UnaryOp::Sigmoid, x) => {
            // log sigmoid(x) = -softplus(-x)
            let nx = neg(x, sp);
            let sp_ = Expr::new(ExprKind::Unary(UnaryOp::Softplus, Box::new(nx)), x.ty, sp);
            Some(neg(&sp_, sp))
        }
        ExprKind::Binary(BinaryOp::Mul, a, b) => {
            let (la, lb) = (log_simplified(rule, a)?, log_simplified(rule, b)?);
            Some(add(&la, &lb, sp))
        }
        ExprKind::Binary(BinaryOp::Div, a, b) => {
            let (la, lb) = (log_simplified(rule, a)?, log_simplified(rule, b)?);
            Some(add(&la, &neg(&lb, sp), sp))
        }
        ExprKind::Input(i) if matches!(rule.inputs[*i].domain, Domain::Positive | Domain::Unit) => {
            Some(Expr::new(ExprKind::Unary(UnaryOp::Log, Box::new(w.clone())), w.ty, sp))
        }
        _ => None,
    }
}

/// A column state's read scaled into a `[K]` vector, `sum_r a_r (n . x_r) + free`, is the
/// column's own linear map: low-rank terms `a_r x_r^T` and the write `(free, 1)`.
fn column_map(v: LinVec) -> Option<LinMat> {
    if v.of == Of::S || !v.terms.iter().all(|(c, _)| c.as_ref().is_some_and(|c| c.ty == Ty::VecK)) {
        return None;
    }
    let low_rank = v.terms.into_iter().filter_map(|(c, x)| c.map(|c| (c, x))).collect();
    let writes = v.free.map(|f| (f.clone(), num(1.0, f.span))).into_iter().collect();
    Some(LinMat { of: v.of, version: v.version, w: None, low_rank, vside: None, writes })
}

/// Sum of two symbolic values of the same type.
fn add_sym(x: Sym, y: Sym, sp: Span) -> Sym {
    let as_map = |s: Sym| match s {
        Sym::Vec(v) if v.of != Of::S => match column_map(v.clone()) {
            Some(m) => Sym::Mat(m),
            None => Sym::Vec(v),
        },
        s => s,
    };
    let (x, y) = match (x, y) {
        (m @ Sym::Mat(_), v @ Sym::Vec(_)) | (v @ Sym::Vec(_), m @ Sym::Mat(_)) => (m, as_map(v)),
        xy => xy,
    };
    match (x, y) {
        (Sym::Mat(a), Sym::Mat(b)) => {
            if a.has_state() && b.has_state() && a.of != b.of {
                return opaque("adds terms linear in two different states", sp);
            }
            if a.has_state() && b.has_state() && a.version != b.version {
                return opaque("mixes the state before and after the update", sp);
            }
            let vside = match (a.has_state().then_some(&a.vside), b.has_state().then_some(&b.vside)) {
                (Some(d1), Some(d2)) if !same_opt(d1, d2) => {
                    return opaque("adds two state terms scaled by different [V] vectors", sp)
                }
                (Some(d), _) | (None, Some(d)) => d.clone(),
                (None, None) => None,
            };
            let version = if a.has_state() { a.version } else { b.version };
            let of = if a.has_state() { a.of } else { b.of };
            let w = match (a.w, b.w) {
                (Some(x), Some(y)) => Some(add(&x, &y, sp)),
                (x, y) => x.or(y),
            };
            Sym::Mat(LinMat {
                of,
                version,
                w,
                low_rank: [a.low_rank, b.low_rank].concat(),
                vside,
                writes: [a.writes, b.writes].concat(),
            })
        }
        (Sym::Vec(a), Sym::Vec(b)) => {
            if !a.terms.is_empty() && !b.terms.is_empty() && a.of != b.of {
                return opaque("adds reads of two different states", sp);
            }
            if !a.terms.is_empty() && !b.terms.is_empty() && a.version != b.version {
                return opaque("the expression reads both the state before and after the update", sp);
            }
            let version = if a.terms.is_empty() { b.version } else { a.version };
            let of = if a.terms.is_empty() { b.of } else { a.of };
            let free = match (a.free, b.free) {
                (Some(x), Some(y)) => Some(add(&x, &y, sp)),
                (x, y) => x.or(y),
            };
            Sym::Vec(LinVec { of, version, terms: [a.terms, b.terms].concat(), free })
        }
        // A state-free term (a [V] vector, or a scalar added to every entry) is the affine
        // part of a state read: it stays free, and becomes a write if the read is written.
        (Sym::Vec(mut a), Sym::Free(f)) | (Sym::Free(f), Sym::Vec(mut a)) if f.ty != Ty::VecK => {
            a.free = Some(match a.free {
                Some(x) => add(&x, &f, sp),
                None if a.of == Of::S => splat(f, Ty::VecV),
                None => f,
            });
            Sym::Vec(a)
        }
        // A state-free matrix term added to the state is a write: a scalar c everywhere is
        // outer(1, c), a [K] vector x down the columns outer(x, 1), a [V] vector y along the
        // rows outer(1, y).
        (Sym::Mat(mut m), Sym::Free(f)) | (Sym::Free(f), Sym::Mat(mut m)) => {
            let one = num(1.0, f.span);
            // A column's writes carry a scalar value.
            let value_ty = if m.of == Of::S { Ty::VecV } else { Ty::Scalar };
            let write = match f.ty {
                Ty::VecK => (f, splat(one, value_ty)),
                _ => (splat(one, Ty::VecK), splat(f, value_ty)),
            };
            m.writes.push(write);
            Sym::Mat(m)
        }
        _ => opaque("adds a constant to a value that depends on the state (not linear)", sp),
    }
}

/// The low-rank terms (or the writes) with those that share a vector merged: `a b1^T + a b2^T` is
/// `a (b1 + b2)^T` (and `-a b2^T` gives `a (b1 - b2)^T`), likewise for a shared `b`; so the
/// rank is that of the transition as written, not the number of terms the expansion made
/// (two Householder steps expand to three terms of rank two).
fn merge_low_rank(mut terms: Vec<(Expr, Expr)>, sp: Span) -> Vec<(Expr, Expr)> {
    // +1 when x and y are the same expression, -1 when one is the other negated.
    let sign = |x: &Expr, y: &Expr| -> Option<f64> {
        match (&x.kind, &y.kind) {
            _ if same(x, y) => Some(1.0),
            (ExprKind::Unary(UnaryOp::Neg, nx), _) if same(nx, y) => Some(-1.0),
            (_, ExprKind::Unary(UnaryOp::Neg, ny)) if same(x, ny) => Some(-1.0),
            _ => None,
        }
    };
    'again: loop {
        for i in 0..terms.len() {
            for j in i + 1..terms.len() {
                let (ai, bi) = &terms[i];
                let (aj, bj) = &terms[j];
                let merged = if let Some(s) = sign(ai, aj) {
                    (ai.clone(), add(bi, &mul(&num(s, sp), bj, sp), sp))
                } else if let Some(s) = sign(bi, bj) {
                    (add(ai, &mul(&num(s, sp), aj, sp), sp), bi.clone())
                } else {
                    continue;
                };
                terms[i] = merged;
                terms.remove(j);
                continue 'again;
            }
        }
        return terms;
    }
}

/// `e` broadcast to the vector type `ty` (a scalar's value in every entry); the lowering
/// gives a vector-typed expression its full width.
fn splat(e: Expr, ty: Ty) -> Expr {
    if e.ty == Ty::Scalar {
        Expr { ty, ..e }
    } else {
        e
    }
}

/// Multiplies a symbolic value by a state-free factor (scalar, `[K]` or `[V]`).
fn scale_sym(s: Sym, f: &Expr) -> Sym {
    let sp = f.span;
    match s {
        Sym::Free(x) => Sym::Free(mul(&x, f, sp)),
        Sym::Mat(mut m) if f.ty != Ty::VecV => {
            m.w = m.w.map(|w| mul(&w, f, sp));
            m.low_rank = m.low_rank.into_iter().map(|(a, b)| (mul(&a, f, sp), b)).collect();
            m.writes = m.writes.into_iter().map(|(k, v)| (mul(&k, f, sp), v)).collect();
            Sym::Mat(m)
        }
        // The checker only lets a transposed matrix stand left of `@`; a scalar factor commutes.
        Sym::MatT(m) if f.ty == Ty::Scalar => match scale_sym(Sym::Mat(m), f) {
            Sym::Mat(m) => Sym::MatT(m),
            s => s,
        },
        Sym::MatT(_) => opaque("scales a transposed state by a vector", sp),
        Sym::Mat(mut m) => {
            if m.has_state() {
                m.vside = Some(match m.vside {
                    Some(d) => mul(&d, f, sp),
                    None => f.clone(),
                });
            }
            m.writes = m.writes.into_iter().map(|(k, v)| (k, mul(&v, f, sp))).collect();
            Sym::Mat(m)
        }
        Sym::Vec(mut v) => {
            v.free = v.free.map(|x| mul(&x, f, sp));
            v.terms = v
                .terms
                .into_iter()
                .map(|(c, x)| match f.ty {
                    Ty::Scalar => (c, mul(&x, f, sp)),
                    _ => (Some(c.map_or_else(|| f.clone(), |c| mul(&c, f, sp))), x),
                })
                .collect();
            Sym::Vec(v)
        }
        s => s,
    }
}

/// dot, outer and `@` where at least one side depends on the state.
fn product(e: &Expr, x: Sym, y: Sym) -> Sym {
    let sp = e.span;
    match (&e.kind, x, y) {
        (ExprKind::Outer(..), Sym::Free(_), Sym::Vec(v)) if v.of != Of::S => {
            opaque("writes a read of an extra state into S; states that feed each other are not chunked", sp)
        }
        (ExprKind::Outer(..), Sym::Free(a), Sym::Vec(v)) => {
            if v.version == Version::New {
                return opaque("writes a term read from the state after its last update", sp);
            }
            let mut vside: Option<Option<Expr>> = None;
            let mut low_rank = vec![];
            for (coef, x) in v.terms {
                match &vside {
                    Some(d) if !same_opt(d, &coef) => {
                        return opaque("writes state reads scaled by different [V] vectors", sp);
                    }
                    _ => vside = Some(coef),
                }
                low_rank.push((a.clone(), x));
            }
            let writes = v.free.map(|f| vec![(a, f)]).unwrap_or_default();
            Sym::Mat(LinMat { of: Of::S, version: v.version, w: None, low_rank, vside: vside.flatten(), writes })
        }
        (ExprKind::Outer(..), Sym::Free(a), Sym::Free(b)) => Sym::Mat(LinMat {
            of: Of::S,
            version: Version::Old,
            w: None,
            low_rank: vec![],
            vside: None,
            writes: vec![(a, b)],
        }),
        // A column state read through a [K] vector: n . x, a scalar.
        (ExprKind::Dot(..) | ExprKind::MatMul(..), Sym::Mat(m), Sym::Free(x))
        | (ExprKind::Dot(..) | ExprKind::MatMul(..), Sym::Free(x), Sym::Mat(m))
            if m.of != Of::S =>
        {
            read(m, &x, sp)
        }
        (ExprKind::MatMul(..), Sym::MatT(m), Sym::Free(x)) | (ExprKind::MatMul(..), Sym::Free(x), Sym::Mat(m))
            if x.ty == Ty::VecK =>
        {
            read(m, &x, sp)
        }
        (ExprKind::MatMul(..), Sym::Mat(_), _) | (ExprKind::MatMul(..), _, Sym::MatT(_)) => {
            opaque("S @ y gives a [K] vector that depends on the state; only S^T @ x reads are chunked", sp)
        }
        // dot(S^T x, y) = x^T S y is linear in S, but a scalar: no S^T @ x read carries it.
        (ExprKind::Dot(..) | ExprKind::MatMul(..), Sym::Vec(_), _)
        | (ExprKind::Dot(..) | ExprKind::MatMul(..), _, Sym::Vec(_)) => opaque(
            "a dot product with a state read gives a scalar that depends on the state (x^T S y); only \
                 S^T @ x reads, scaled elementwise, are chunked",
            sp,
        ),
        (ExprKind::Outer(..), Sym::Vec(_), _) => {
            opaque("outer(...) of a [K] value read from the state; state reads can only be written as the [V] side", sp)
        }
        _ => opaque("a product of values that depend on the state in a form the chunked kernels do not take", sp),
    }
}

/// `S^T x` for the linear matrix `m` (a column's `n . x`):
/// `(K S D + sum kw vw^T)^T x = D S^T K^T x + sum vw (kw . x)` with `K^T x = w x + sum b (a . x)`.
fn read(m: LinMat, x: &Expr, sp: Span) -> Sym {
    let mut terms = vec![];
    if let Some(w) = &m.w {
        terms.push((m.vside.clone(), mul(w, x, sp)));
    }
    for (a, b) in &m.low_rank {
        terms.push((m.vside.clone(), mul(b, &dot(a, x, sp), sp)));
    }
    let mut free: Option<Expr> = None;
    for (kw, vw) in &m.writes {
        let t = mul(vw, &dot(kw, x, sp), sp);
        free = Some(match free {
            Some(f) => add(&f, &t, sp),
            None => t,
        });
    }
    if terms.is_empty() {
        return free.map(Sym::Free).unwrap_or_else(|| opaque("a zero product", sp));
    }
    Sym::Vec(LinVec { of: m.of, version: m.version, terms, free })
}

fn same_opt(a: &Option<Expr>, b: &Option<Expr>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(x), Some(y)) => same(x, y),
        _ => false,
    }
}

/// Structural equality, ignoring spans.
pub fn same(a: &Expr, b: &Expr) -> bool {
    a.ty == b.ty
        && match (&a.kind, &b.kind) {
            (ExprKind::Num(x), ExprKind::Num(y)) => x == y,
            (ExprKind::Input(x), ExprKind::Input(y)) | (ExprKind::Local(x), ExprKind::Local(y)) => x == y,
            (ExprKind::Unary(o1, _), ExprKind::Unary(o2, _)) if o1 != o2 => false,
            (ExprKind::Binary(o1, ..), ExprKind::Binary(o2, ..)) if o1 != o2 => false,
            (ka, kb) if std::mem::discriminant(ka) == std::mem::discriminant(kb) => {
                let (ca, cb) = (a.children(), b.children());
                ca.len() == cb.len() && ca.iter().zip(&cb).all(|(x, y)| same(x, y))
            }
            _ => false,
        }
}

/// `e'` with `e = f * e'` (through negations, products and numerators) and `e'` of `e`'s
/// type; None when `f` is not such a factor.
pub fn without_factor(e: &Expr, f: &Expr) -> Option<Expr> {
    let kept = |x: Expr| (x.ty == e.ty).then_some(x);
    match &e.kind {
        ExprKind::Unary(UnaryOp::Neg, x) => without_factor(x, f).and_then(kept).map(|x| neg(&x, e.span)),
        ExprKind::Binary(BinaryOp::Mul, x, y) => {
            if same(x, f) && y.ty == e.ty {
                return Some((**y).clone());
            }
            if same(y, f) && x.ty == e.ty {
                return Some((**x).clone());
            }
            if let Some(x2) = without_factor(x, f).filter(|x2| x2.ty == x.ty) {
                return Some(rebuild2(e, x2, (**y).clone()));
            }
            without_factor(y, f).filter(|y2| y2.ty == y.ty).map(|y2| rebuild2(e, (**x).clone(), y2))
        }
        ExprKind::Binary(BinaryOp::Div, x, y) => {
            without_factor(x, f).filter(|x2| x2.ty == x.ty).map(|x2| rebuild2(e, x2, (**y).clone()))
        }
        _ => None,
    }
}

fn is_one(e: &Expr) -> bool {
    matches!(e.kind, ExprKind::Num(x) if x == 1.0)
}

fn num(x: f64, sp: Span) -> Expr {
    Expr::new(ExprKind::Num(x), Ty::Scalar, sp)
}

/// Result type of an elementwise op between two vector/scalar types.
fn bcast(a: Ty, b: Ty) -> Ty {
    if a == Ty::Scalar {
        b
    } else {
        a
    }
}

/// a * b with constant folding.
pub fn mul(a: &Expr, b: &Expr, sp: Span) -> Expr {
    // Folding keeps the product's type: 1 * beta with a [V] vector of ones is [V].
    let ty = bcast(a.ty, b.ty);
    match (&a.kind, &b.kind) {
        (ExprKind::Num(x), ExprKind::Num(y)) => splat(num(x * y, sp), ty),
        (ExprKind::Num(x), _) if *x == 1.0 => splat(b.clone(), ty),
        (_, ExprKind::Num(y)) if *y == 1.0 => splat(a.clone(), ty),
        (ExprKind::Num(x), _) if *x == -1.0 => neg(&splat(b.clone(), ty), sp),
        (_, ExprKind::Num(y)) if *y == -1.0 => neg(&splat(a.clone(), ty), sp),
        _ => {
            Expr::new(ExprKind::Binary(BinaryOp::Mul, Box::new(a.clone()), Box::new(b.clone())), bcast(a.ty, b.ty), sp)
        }
    }
}

/// a + b with constant folding.
pub fn add(a: &Expr, b: &Expr, sp: Span) -> Expr {
    match (&a.kind, &b.kind) {
        (ExprKind::Num(x), ExprKind::Num(y)) => splat(num(x + y, sp), bcast(a.ty, b.ty)),
        (ExprKind::Num(x), _) if *x == 0.0 && a.ty == Ty::Scalar && b.ty == Ty::Scalar => b.clone(),
        (ExprKind::Unary(UnaryOp::Neg, nb), _) => {
            Expr::new(ExprKind::Binary(BinaryOp::Sub, Box::new(b.clone()), nb.clone()), bcast(a.ty, b.ty), sp)
        }
        (_, ExprKind::Unary(UnaryOp::Neg, nb)) => {
            Expr::new(ExprKind::Binary(BinaryOp::Sub, Box::new(a.clone()), nb.clone()), bcast(a.ty, b.ty), sp)
        }
        _ => {
            Expr::new(ExprKind::Binary(BinaryOp::Add, Box::new(a.clone()), Box::new(b.clone())), bcast(a.ty, b.ty), sp)
        }
    }
}

/// -a with constant folding.
pub fn neg(a: &Expr, sp: Span) -> Expr {
    match &a.kind {
        ExprKind::Num(x) => num(-x, sp),
        ExprKind::Unary(UnaryOp::Neg, x) => (**x).clone(),
        _ => Expr::new(ExprKind::Unary(UnaryOp::Neg, Box::new(a.clone())), a.ty, sp),
    }
}

fn dot(a: &Expr, b: &Expr, sp: Span) -> Expr {
    Expr::new(ExprKind::Dot(Box::new(a.clone()), Box::new(b.clone())), Ty::Scalar, sp)
}

/// `e` with its single child replaced.
fn rebuild1(e: &Expr, x: Expr) -> Expr {
    let kind = match &e.kind {
        ExprKind::Unary(op, _) => ExprKind::Unary(*op, Box::new(x)),
        ExprKind::Sum(_) => ExprKind::Sum(Box::new(x)),
        ExprKind::L2Norm(_) => ExprKind::L2Norm(Box::new(x)),
        ExprKind::Transpose(_) => ExprKind::Transpose(Box::new(x)),
        k => k.clone(),
    };
    Expr::new(kind, e.ty, e.span)
}

/// `e` with its two children replaced.
fn rebuild2(e: &Expr, x: Expr, y: Expr) -> Expr {
    let (x, y) = (Box::new(x), Box::new(y));
    let kind = match &e.kind {
        ExprKind::Binary(op, ..) => ExprKind::Binary(*op, x, y),
        ExprKind::Dot(..) => ExprKind::Dot(x, y),
        ExprKind::Outer(..) => ExprKind::Outer(x, y),
        ExprKind::MatMul(..) => ExprKind::MatMul(x, y),
        k => k.clone(),
    };
    Expr::new(kind, e.ty, e.span)
}

/// Readable math for an expression, with the fewest parentheses.
pub fn print_expr(rule: &Rule, e: &Expr) -> String {
    let mut s = String::new();
    print_into(rule, e, 0, &mut s);
    s
}

fn prec(e: &Expr) -> u8 {
    match &e.kind {
        ExprKind::Binary(op, ..) if op.is_comparison() => 1,
        ExprKind::Binary(BinaryOp::Add, x, y) if as_where(x, y).is_some() => 6,
        ExprKind::Binary(BinaryOp::Add | BinaryOp::Sub, ..) => 2,
        ExprKind::Binary(BinaryOp::Mul | BinaryOp::Div, ..) => 3,
        ExprKind::MatMul(..) => 4,
        ExprKind::Unary(UnaryOp::Neg, _) => 5,
        _ => 6,
    }
}

fn print_into(rule: &Rule, e: &Expr, min: u8, s: &mut String) {
    let p = prec(e);
    let paren = p < min;
    if paren {
        s.push('(');
    }
    match &e.kind {
        ExprKind::Num(x) => {
            let _ = write!(s, "{x}");
        }
        ExprKind::Input(i) => s.push_str(&rule.inputs[*i].name),
        ExprKind::Local(i) => s.push_str(&rule.locals[*i].name),
        ExprKind::State => s.push('S'),
        ExprKind::Extra(i) => s.push_str(&rule.states[*i].name),
        ExprKind::Read(0) => s.push_str("(S^T q)"),
        ExprKind::Read(i) => {
            let _ = write!(s, "dot({}, q)", rule.states.get(*i - 1).map_or("?", |x| x.name.as_str()));
        }
        ExprKind::Scale => s.push_str("scale"),
        ExprKind::Head => s.push_str("head"),
        ExprKind::Unary(UnaryOp::Neg, a) => {
            s.push('-');
            print_into(rule, a, 6, s);
        }
        ExprKind::Unary(op, a) => call(rule, op.name(), &[a], s),
        ExprKind::Binary(op @ (BinaryOp::Pow | BinaryOp::Min | BinaryOp::Max), a, b) => {
            call(rule, op.symbol(), &[a, b], s)
        }
        ExprKind::Binary(BinaryOp::Add, x, y) if as_where(x, y).is_some() => {
            if let Some((c, a, b)) = as_where(x, y) {
                call(rule, "where", &[c, a, b], s);
            }
        }
        ExprKind::Binary(BinaryOp::Keep, c, a) => call(rule, "where", &[c, a, &num(0.0, e.span)], s),
        ExprKind::Binary(op, a, b) if op.is_comparison() => {
            // Comparisons do not chain: both sides in parentheses when they are comparisons.
            print_into(rule, a, p + 1, s);
            let _ = write!(s, " {} ", op.symbol());
            print_into(rule, b, p + 1, s);
        }
        ExprKind::Binary(op, a, b) => {
            print_into(rule, a, p, s);
            let _ = write!(s, " {} ", op.symbol());
            print_into(rule, b, p + 1, s);
        }
        ExprKind::Dot(a, b) => call(rule, "dot", &[a, b], s),
        ExprKind::Outer(a, b) => call(rule, "outer", &[a, b], s),
        ExprKind::Sum(a) => call(rule, "sum", &[a], s),
        ExprKind::L2Norm(a) => call(rule, "l2norm", &[a], s),
        ExprKind::Transpose(a) => {
            print_into(rule, a, 6, s);
            s.push_str("^T");
        }
        ExprKind::MatMul(a, b) => {
            print_into(rule, a, p, s);
            s.push_str(" @ ");
            print_into(rule, b, p + 1, s);
        }
    }
    if paren {
        s.push(')');
    }
}

/// `(c, a, b)` when `x + y` is `where(c, a, b)` as the checker writes it:
/// `Keep(c, a) + Keep(c == 0, b)`.
fn as_where<'e>(x: &'e Expr, y: &'e Expr) -> Option<(&'e Expr, &'e Expr, &'e Expr)> {
    let (ExprKind::Binary(BinaryOp::Keep, c, a), ExprKind::Binary(BinaryOp::Keep, not_c, b)) = (&x.kind, &y.kind)
    else {
        return None;
    };
    let ExprKind::Binary(BinaryOp::Equal, c2, zero) = &not_c.kind else { return None };
    (matches!(zero.kind, ExprKind::Num(z) if z == 0.0) && c2 == c).then_some((c, a, b))
}

fn call(rule: &Rule, name: &str, args: &[&Expr], s: &mut String) {
    s.push_str(name);
    s.push('(');
    for (i, a) in args.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        print_into(rule, a, 0, s);
    }
    s.push(')');
}

impl Canonical {
    /// The canonical form in readable math, one item a line.
    pub fn describe(&self, rule: &Rule) -> String {
        let p = |e: &Expr| print_expr(rule, e);
        let mut s = String::new();
        let _ = writeln!(s, "class: {}", self.class.describe());
        let d = if self.log_vgate.is_some() { " D_t" } else { "" };
        let _ = writeln!(s, "update: S_t = A_t S_(t-1){d} + sum_j kw_j vw_j^T");
        match &self.log_gate {
            Some(g) => {
                let _ = writeln!(s, "  log w   = {}   ({})", p(g), if g.ty == Ty::VecK { "[K]" } else { "scalar" });
            }
            None => {
                let _ = writeln!(s, "  w       = 1");
            }
        }
        if let Some(d) = &self.log_vgate {
            let _ = writeln!(s, "  log d   = {}   ([V], the value side: A_t S D_t)", p(d));
        }
        for (i, (a, b)) in self.low_rank.iter().enumerate() {
            let _ = writeln!(s, "  a_{} = {}\n  b_{} = {}", i + 1, p(a), i + 1, p(b));
        }
        for (j, (k, v)) in self.writes.iter().enumerate() {
            let _ = writeln!(s, "  kw_{} = {}\n  vw_{} = {}", j + 1, p(k), j + 1, p(v));
        }
        for col in &self.columns {
            let name = &rule.states[col.state].name;
            let _ = writeln!(s, "state {name} [K]: one more column of S, n_t = A_t n_(t-1) + sum_j kw_j c_j");
            for (j, (k, c)) in col.writes.iter().enumerate() {
                let _ = writeln!(s, "  kw_{} = {}\n  c_{}  = {}", j + 1, p(k), j + 1, p(c));
            }
        }
        let o = &self.output;
        if let Some(e) = &o.epilogue {
            let which = if o.read == Read::After { "t" } else { "(t-1)" };
            let _ = writeln!(
                s,
                "output: o_t = {}   (reads of S_{which} and its columns through q)\n  q = {}",
                p(e),
                p(&o.query)
            );
            return s;
        }
        let which = if o.read == Read::After { "S_t" } else { "S_(t-1)" };
        let coef = o.coef.as_ref().map(|c| format!("{} ⊙ ", p(c))).unwrap_or_default();
        let extra = o.extra.as_ref().map(|x| format!(" + {}", p(x))).unwrap_or_default();
        let _ = writeln!(s, "output: o_t = {coef}{which}^T q{extra}\n  q = {}", p(&o.query));
        s
    }
}
