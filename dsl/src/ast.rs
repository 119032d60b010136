//! The checked rule: the typed AST that every later stage consumes.
//!
//! The front end (`parse` + `check`) produces a [`Rule`]; the reference interpreter evaluates
//! it directly, and `canon` derives the canonical form from it. Every node keeps the span of
//! the rule-file text it came from, so that any later stage can point at it in a diagnostic.

use std::fmt;

/// Byte range in the rule file's source text.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub fn new(start: usize, end: usize) -> Span {
        Span { start, end }
    }
    /// The smallest span covering both.
    pub fn join(self, other: Span) -> Span {
        Span { start: self.start.min(other.start), end: self.end.max(other.end) }
    }
}

/// Types of rule values. One token, one head: K and V are the key and value widths.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ty {
    Scalar,
    /// A vector indexed by key channel, `[K]`.
    VecK,
    /// A vector indexed by value channel, `[V]`.
    VecV,
    /// The state's shape, K x V.
    Mat,
    /// The transposed state shape, V x K (only as the left operand of `@`).
    MatT,
}

impl fmt::Display for Ty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Ty::Scalar => "scalar",
            Ty::VecK => "[K]",
            Ty::VecV => "[V]",
            Ty::Mat => "[K, V] matrix",
            Ty::MatT => "[V, K] matrix",
        })
    }
}

/// What values an input takes; used to draw random inputs for `verify` and to prove that
/// gates are positive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Domain {
    /// Any real number (random inputs: standard normal).
    Any,
    /// A natural-log decay, <= 0 (random inputs: logsigmoid of normal + 3).
    LogGate,
    /// In (0, 1) (random inputs: sigmoid of normal).
    Unit,
    /// Strictly positive.
    Positive,
    /// A `[K]` vector of unit L2 norm.
    UnitNorm,
    /// Strictly negative (e.g. Mamba-2's A).
    Negative,
}

impl Domain {
    pub fn name(self) -> &'static str {
        match self {
            Domain::Any => "any",
            Domain::LogGate => "log_gate",
            Domain::Unit => "unit",
            Domain::Positive => "positive",
            Domain::UnitNorm => "unit_norm",
            Domain::Negative => "negative",
        }
    }
    pub const ALL: [Domain; 6] =
        [Domain::Any, Domain::LogGate, Domain::Unit, Domain::Positive, Domain::UnitNorm, Domain::Negative];
}

/// One declared input of the rule.
#[derive(Clone, Debug, PartialEq)]
pub struct Input {
    pub name: String,
    /// `Scalar`, `VecK` or `VecV`.
    pub ty: Ty,
    /// A per-head parameter (tensor `[H]` or `[H, D]`) rather than a per-token input
    /// (tensor `[B, T, H]` or `[B, T, H, D]`).
    pub per_head: bool,
    pub domain: Domain,
    pub span: Span,
}

impl Input {
    /// Width of one row of this input: 1, K or V.
    pub fn width(&self, k: usize, v: usize) -> usize {
        match self.ty {
            Ty::VecK => k,
            Ty::VecV => v,
            _ => 1,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnaryOp {
    Neg,
    Exp,
    Exp2,
    Log,
    Sigmoid,
    Softplus,
    Silu,
    Sqrt,
    Abs,
    Tanh,
}

impl UnaryOp {
    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "-",
            UnaryOp::Exp => "exp",
            UnaryOp::Exp2 => "exp2",
            UnaryOp::Log => "log",
            UnaryOp::Sigmoid => "sigmoid",
            UnaryOp::Softplus => "softplus",
            UnaryOp::Silu => "silu",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Abs => "abs",
            UnaryOp::Tanh => "tanh",
        }
    }
    /// Applies the function in f64 (the reference's arithmetic).
    pub fn apply(self, x: f64) -> f64 {
        match self {
            UnaryOp::Neg => -x,
            UnaryOp::Exp => x.exp(),
            UnaryOp::Exp2 => x.exp2(),
            UnaryOp::Log => x.ln(),
            UnaryOp::Sigmoid => sigmoid(x),
            UnaryOp::Softplus => softplus(x),
            UnaryOp::Silu => x * sigmoid(x),
            UnaryOp::Sqrt => x.sqrt(),
            UnaryOp::Abs => x.abs(),
            UnaryOp::Tanh => x.tanh(),
        }
    }
}

/// Logistic function, stable for large |x|.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// log(1 + e^x), stable for large |x|.
pub fn softplus(x: f64) -> f64 {
    if x > 20.0 {
        x
    } else if x < -20.0 {
        x.exp()
    } else {
        x.exp().ln_1p()
    }
}

/// Elementwise binary operators, with broadcasting: a scalar combines with anything; a `[K]`
/// vector with a K x V matrix scales its rows, a `[V]` vector its columns.
///
/// Comparisons give 1 where they hold and 0 elsewhere (0 when either side is NaN, except for
/// `!=`). `min` and `max` are NaN when either operand is. `relu`, `clip` and `where` are
/// written with these: `relu(x) = max(x, 0)`, `clip(x, lo, hi) = min(max(x, lo), hi)` and
/// `where(c, a, b) = Keep(c, a) + Keep(c == 0, b)`, so that the branch not taken never
/// reaches the result (not even as a NaN or an infinity times 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    Min,
    Max,
    Lt,
    Le,
    Gt,
    Ge,
    Equal,
    NotEqual,
    /// `Keep(c, x)`: `x` where `c != 0`, else 0 (half of a `where`).
    Keep,
}

impl BinaryOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinaryOp::Add => "+",
            BinaryOp::Sub => "-",
            BinaryOp::Mul => "*",
            BinaryOp::Div => "/",
            BinaryOp::Pow => "pow",
            BinaryOp::Min => "min",
            BinaryOp::Max => "max",
            BinaryOp::Lt => "<",
            BinaryOp::Le => "<=",
            BinaryOp::Gt => ">",
            BinaryOp::Ge => ">=",
            BinaryOp::Equal => "==",
            BinaryOp::NotEqual => "!=",
            BinaryOp::Keep => "where",
        }
    }
    /// True for `< <= > >= == !=`.
    pub fn is_comparison(self) -> bool {
        matches!(self, BinaryOp::Lt | BinaryOp::Le | BinaryOp::Gt | BinaryOp::Ge | BinaryOp::Equal | BinaryOp::NotEqual)
    }
    pub fn apply(self, a: f64, b: f64) -> f64 {
        let truth = |c: bool| if c { 1.0 } else { 0.0 };
        match self {
            BinaryOp::Add => a + b,
            BinaryOp::Sub => a - b,
            BinaryOp::Mul => a * b,
            BinaryOp::Div => a / b,
            BinaryOp::Pow => a.powf(b),
            BinaryOp::Min | BinaryOp::Max if a.is_nan() || b.is_nan() => f64::NAN,
            BinaryOp::Min => a.min(b),
            BinaryOp::Max => a.max(b),
            BinaryOp::Lt => truth(a < b),
            BinaryOp::Le => truth(a <= b),
            BinaryOp::Gt => truth(a > b),
            BinaryOp::Ge => truth(a >= b),
            BinaryOp::Equal => truth(a == b),
            BinaryOp::NotEqual => truth(a != b),
            BinaryOp::Keep => {
                if a != 0.0 {
                    b
                } else {
                    0.0
                }
            }
        }
    }
}

/// Where a statement writes.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    /// The state `S` (K x V).
    State,
    /// An extra state declared in `[states]`; the index is into [`Rule::states`].
    Extra(usize),
    /// The output `o` (`[V]`).
    Output,
    /// A local value; the index is into [`Rule::locals`].
    Local(usize),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Stmt {
    pub target: Target,
    pub value: Expr,
    /// The whole statement (`name = expr`).
    pub span: Span,
}

/// A typed expression.
#[derive(Clone, Debug, PartialEq)]
pub struct Expr {
    pub kind: ExprKind,
    pub ty: Ty,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ExprKind {
    Num(f64),
    /// An input; the index is into [`Rule::inputs`].
    Input(usize),
    /// A local assigned by an earlier statement; the index is into [`Rule::locals`].
    Local(usize),
    /// The state as it is at this point of the step (`S`, K x V).
    State,
    /// An extra state (`[K]` or `[V]`) as it is at this point of the step; the index is into
    /// [`Rule::states`].
    Extra(usize),
    /// A state read in a canonical output's epilogue (`canon::Output::epilogue`; never in a
    /// rule): 0 is `S^T q` (`[V]`), `1 + i` is extra column i's `n_i . q` (scalar).
    Read(usize),
    /// `scale`, the output scale (1/sqrt(K) unless the run overrides it).
    Scale,
    /// `head`, the head index counted from 0, as a scalar.
    Head,
    Unary(UnaryOp, Box<Expr>),
    Binary(BinaryOp, Box<Expr>, Box<Expr>),
    /// `dot(a, b)`: two vectors of the same kind -> scalar.
    Dot(Box<Expr>, Box<Expr>),
    /// `sum(x)`: sum of a vector's entries -> scalar.
    Sum(Box<Expr>),
    /// `l2norm(x)`: x / sqrt(sum(x*x)), same type.
    L2Norm(Box<Expr>),
    /// `outer(a, b)`: `[K]` x `[V]` -> K x V.
    Outer(Box<Expr>, Box<Expr>),
    /// `M^T`: a K x V matrix seen as V x K (type `MatT`).
    Transpose(Box<Expr>),
    /// `a @ b`: matrix-vector, vector-matrix and vector-vector products. The operand types
    /// decide: `Mat @ VecV -> VecK`, `MatT @ VecK -> VecV`, `VecK @ Mat -> VecV`,
    /// `VecV @ MatT -> VecK`, and two vectors of one kind -> scalar.
    MatMul(Box<Expr>, Box<Expr>),
}

impl Expr {
    pub fn new(kind: ExprKind, ty: Ty, span: Span) -> Expr {
        Expr { kind, ty, span }
    }

    /// Calls `f` on every direct child.
    pub fn children(&self) -> Vec<&Expr> {
        match &self.kind {
            ExprKind::Num(_)
            | ExprKind::Input(_)
            | ExprKind::Local(_)
            | ExprKind::State
            | ExprKind::Extra(_)
            | ExprKind::Read(_)
            | ExprKind::Scale
            | ExprKind::Head => vec![],
            ExprKind::Unary(_, a) | ExprKind::Sum(a) | ExprKind::L2Norm(a) | ExprKind::Transpose(a) => vec![a],
            ExprKind::Binary(_, a, b) | ExprKind::Dot(a, b) | ExprKind::Outer(a, b) | ExprKind::MatMul(a, b) => {
                vec![a, b]
            }
        }
    }

    /// True when the expression (transitively, not looking through locals) mentions `S` or
    /// an extra state.
    pub fn mentions_state(&self) -> bool {
        matches!(self.kind, ExprKind::State | ExprKind::Extra(_)) || self.children().iter().any(|c| c.mentions_state())
    }
}

/// A local value: `name = expr` statements whose target is neither `S` nor `o`.
#[derive(Clone, Debug, PartialEq)]
pub struct Local {
    pub name: String,
    pub ty: Ty,
    pub span: Span,
}

/// A state beside `S`, declared in the rule file's `[states]` table (`n = "[K]"`): a
/// vector carried from token to token, entering as tensor `<name>0` and leaving as
/// `<name>T`, both `[B, H, D]`.
#[derive(Clone, Debug, PartialEq)]
pub struct StateDecl {
    pub name: String,
    /// `VecK` or `VecV`.
    pub ty: Ty,
    pub span: Span,
}

impl StateDecl {
    /// The tensor holding this state as the sequence enters.
    pub fn initial_name(&self) -> String {
        format!("{}0", self.name)
    }
    /// The tensor holding this state as the sequence leaves.
    pub fn final_name(&self) -> String {
        format!("{}T", self.name)
    }
    /// Width of one head's state: K or V.
    pub fn width(&self, k: usize, v: usize) -> usize {
        if self.ty == Ty::VecK {
            k
        } else {
            v
        }
    }
}

/// A checked rule.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub name: String,
    pub summary: String,
    pub inputs: Vec<Input>,
    pub locals: Vec<Local>,
    /// The states beside `S` (`[states]`), in declaration order.
    pub states: Vec<StateDecl>,
    /// The per-token step, in order. Every read of `S` sees the state as left by the
    /// statements before it (the state before the update for the first ones).
    pub stmts: Vec<Stmt>,
    /// `chunked = true` in the file: the rule must be chunkable, and it is an error if not.
    pub require_chunked: bool,
    /// Span of `chunked = true`, when present.
    pub chunked_span: Option<Span>,
    /// Path of the rule file (for diagnostics) and its full text.
    pub path: String,
    pub source: String,
}

impl Rule {
    pub fn input(&self, name: &str) -> Option<&Input> {
        self.inputs.iter().find(|i| i.name == name)
    }
}
