//! The reference: the checked rule interpreted token by token in f64, and its gradient.
//!
//! It reads the typed statements directly and never the canonical form, so that it can check
//! both the canonical form and every kernel generated from it.
//!
//! Every value a step computes is a node of a [`Tape`] (its operation, its operands, its
//! value). The forward run keeps one token's nodes at a time; [`grad`] keeps a whole
//! sequence's and walks them backwards (`gradient.rs`: reverse mode over this interpreter,
//! never over the canonical form).

use crate::ast::*;

/// Problem sizes. Tensors use FLA's layouts: per-token inputs `[B, T, H]` (scalar) or
/// `[B, T, H, D]`, per-head parameters `[H]` or `[H, D]`, `o` `[B, T, H, V]`, states `[B, H, K, V]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub batch: usize,
    pub seq_len: usize,
    pub heads: usize,
    pub k: usize,
    pub v: usize,
}

impl Dims {
    /// Shape of an input's tensor.
    pub fn input_shape(&self, input: &Input) -> Vec<usize> {
        let w = input.width(self.k, self.v);
        match (input.per_head, input.ty) {
            (true, Ty::Scalar) => vec![self.heads],
            (true, _) => vec![self.heads, w],
            (false, Ty::Scalar) => vec![self.batch, self.seq_len, self.heads],
            (false, _) => vec![self.batch, self.seq_len, self.heads, w],
        }
    }
    pub fn output_shape(&self) -> Vec<usize> {
        vec![self.batch, self.seq_len, self.heads, self.v]
    }
    pub fn state_shape(&self) -> Vec<usize> {
        vec![self.batch, self.heads, self.k, self.v]
    }
}

/// Outputs of a run: `o` `[B, T, H, V]` and the final state `hT` `[B, H, K, V]`.
#[derive(Clone, Debug)]
pub struct Outputs {
    pub o: Vec<f64>,
    pub ht: Vec<f64>,
    /// Each extra state as the sequence leaves (`<name>T`, `[B, H, D]`), in [`Rule::states`]
    /// order.
    pub extra: Vec<Vec<f64>>,
}

impl Outputs {
    pub(crate) fn zeros(rule: &Rule, dims: &Dims) -> Outputs {
        let Dims { batch, seq_len, heads, k, v } = *dims;
        Outputs {
            o: vec![0.0; batch * seq_len * heads * v],
            ht: vec![0.0; batch * heads * k * v],
            extra: rule.states.iter().map(|s| vec![0.0; batch * heads * s.width(k, v)]).collect(),
        }
    }

    /// Copies the final states of sequence (b, h) out of `env`.
    pub(crate) fn store_states(&mut self, env: &Env<'_>, dims: &Dims, (b, h): (usize, usize)) {
        let kv = dims.k * dims.v;
        self.ht[(b * dims.heads + h) * kv..][..kv].copy_from_slice(env.tape.val(env.state).data());
        for (out, &n) in self.extra.iter_mut().zip(&env.extras) {
            let w = env.tape.val(n).data().len();
            out[(b * dims.heads + h) * w..][..w].copy_from_slice(env.tape.val(n).data());
        }
    }
}

/// Each extra state's initial tensor (`<name>0`, `[B, H, D]`) from `input`, None where the
/// caller gives none (zeros).
pub(crate) fn initial_states(
    rule: &Rule,
    dims: &Dims,
    input: &dyn Fn(&str) -> Option<Vec<f64>>,
) -> Result<Vec<Option<Vec<f64>>>, String> {
    rule.states
        .iter()
        .map(|s| {
            let name = s.initial_name();
            let want = dims.batch * dims.heads * s.width(dims.k, dims.v);
            match input(&name) {
                Some(d) if d.len() != want => Err(format!("`{name}` has {} elements, expected {want}", d.len())),
                d => Ok(d),
            }
        })
        .collect()
}

/// One value of the step. Matrices are K x V row-major; `MatT` shares that storage.
#[derive(Clone, Debug)]
pub(crate) enum Val {
    Scalar(f64),
    VecK(Vec<f64>),
    VecV(Vec<f64>),
    Mat(Vec<f64>),
    MatT(Vec<f64>),
}

impl Val {
    /// The elements, in the value's storage order.
    pub(crate) fn data(&self) -> &[f64] {
        match self {
            Val::Scalar(x) => std::slice::from_ref(x),
            Val::VecK(a) | Val::VecV(a) | Val::Mat(a) | Val::MatT(a) => a,
        }
    }
}

/// Where a leaf of the tape comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Leaf {
    /// Input `input` at token `token` (a per-head parameter: every token reads the same).
    Input { input: usize, token: usize },
    /// The state entering the sequence.
    State,
    /// An extra state entering the sequence (index into [`Rule::states`]).
    Extra(usize),
    /// A number, `scale` or `head`: nothing to differentiate.
    Constant,
}

/// How a node was computed, from earlier nodes (by index).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Op {
    Leaf(Leaf),
    Unary(UnaryOp, usize),
    Binary(BinaryOp, usize, usize),
    Dot(usize, usize),
    Sum(usize),
    L2Norm(usize),
    Outer(usize, usize),
    Transpose(usize),
    MatMul(usize, usize),
}

/// The nodes computed so far, in order.
#[derive(Default)]
pub(crate) struct Tape {
    pub(crate) nodes: Vec<(Op, Val)>,
    /// Round every computed value to the nearest f32 (a model of f32 arithmetic, to measure
    /// how much a rule's results move under it; see [`crate::gradient::Arithmetic`]).
    pub(crate) round_to_f32: bool,
}

impl Tape {
    fn push(&mut self, op: Op, mut val: Val) -> usize {
        if self.round_to_f32 {
            match &mut val {
                Val::Scalar(x) => *x = *x as f32 as f64,
                Val::VecK(a) | Val::VecV(a) | Val::Mat(a) | Val::MatT(a) => {
                    a.iter_mut().for_each(|x| *x = *x as f32 as f64)
                }
            }
        }
        self.nodes.push((op, val));
        self.nodes.len() - 1
    }

    pub(crate) fn val(&self, n: usize) -> &Val {
        &self.nodes[n].1
    }
}

/// One (batch, head) sequence being interpreted.
pub(crate) struct Env<'a> {
    rule: &'a Rule,
    k: usize,
    v: usize,
    scale: f64,
    head: usize,
    pub(crate) tape: Tape,
    /// The current token's input nodes, by input index.
    inputs: Vec<usize>,
    locals: Vec<Option<usize>>,
    /// The state's node.
    pub(crate) state: usize,
    /// The extra states' nodes, in [`Rule::states`] order.
    pub(crate) extras: Vec<usize>,
    /// Keep every token's nodes (for the gradient), or only the current token's.
    keep: bool,
    /// The per-head parameters' nodes (one leaf each for the whole sequence when kept).
    per_head: Vec<Option<usize>>,
}

/// The input tensors of a rule, checked against `dims`.
pub(crate) fn input_data(
    rule: &Rule,
    dims: &Dims,
    input: &dyn Fn(&str) -> Option<Vec<f64>>,
) -> Result<Vec<Vec<f64>>, String> {
    let data: Vec<Vec<f64>> = rule
        .inputs
        .iter()
        .map(|i| input(&i.name).ok_or_else(|| format!("input `{}` is missing", i.name)))
        .collect::<Result<_, _>>()?;
    for (inp, d) in rule.inputs.iter().zip(&data) {
        let want: usize = dims.input_shape(inp).iter().product();
        if d.len() != want {
            return Err(format!("input `{}` has {} elements, expected {}", inp.name, d.len(), want));
        }
    }
    Ok(data)
}

/// Runs the rule over every batch and head. `input(name)` gives each input's tensor data in
/// the layout of [`Dims::input_shape`] (the caller has checked the shapes); `h0` is the
/// initial state or zeros, and each extra state starts from `input("<name>0")` or zeros.
pub fn run(
    rule: &Rule,
    dims: Dims,
    scale: f64,
    input: &dyn Fn(&str) -> Option<Vec<f64>>,
    h0: Option<&[f64]>,
) -> Result<Outputs, String> {
    let Dims { batch, seq_len, heads, v, .. } = dims;
    let data = input_data(rule, &dims, input)?;
    let extras0 = initial_states(rule, &dims, input)?;
    let mut out = Outputs::zeros(rule, &dims);
    for b in 0..batch {
        for h in 0..heads {
            let mut env = Env::new(rule, &dims, scale, (b, h), (h0, &extras0), false);
            for t in 0..seq_len {
                let o = env.token(&data, &dims, b, t)?;
                out.o[((b * seq_len + t) * heads + h) * v..][..v].copy_from_slice(env.tape.val(o).data());
            }
            out.store_states(&env, &dims, (b, h));
        }
    }
    Ok(out)
}

impl<'a> Env<'a> {
    /// A sequence of batch `b`, head `h` starting from `h0` and the extra states' initial
    /// tensors (or zeros); with `keep` the tape keeps every token's nodes.
    pub(crate) fn new(
        rule: &'a Rule,
        dims: &Dims,
        scale: f64,
        (b, h): (usize, usize),
        (h0, extras0): (Option<&[f64]>, &[Option<Vec<f64>>]),
        keep: bool,
    ) -> Env<'a> {
        let kv = dims.k * dims.v;
        let state = match h0 {
            Some(s) => s[(b * dims.heads + h) * kv..][..kv].to_vec(),
            None => vec![0.0; kv],
        };
        let mut tape = Tape::default();
        let state = tape.push(Op::Leaf(Leaf::State), Val::Mat(state));
        let extras = rule
            .states
            .iter()
            .zip(extras0)
            .enumerate()
            .map(|(i, (s, x0))| {
                let w = s.width(dims.k, dims.v);
                let x = x0.as_ref().map_or_else(|| vec![0.0; w], |x| x[(b * dims.heads + h) * w..][..w].to_vec());
                tape.push(Op::Leaf(Leaf::Extra(i)), if s.ty == Ty::VecK { Val::VecK(x) } else { Val::VecV(x) })
            })
            .collect();
        Env {
            extras,
            rule,
            k: dims.k,
            v: dims.v,
            scale,
            head: h,
            tape,
            inputs: vec![],
            locals: vec![None; rule.locals.len()],
            state,
            keep,
            per_head: vec![None; rule.inputs.len()],
        }
    }

    /// Interprets token `t` of batch `b` (inputs from `data`, in the layout of
    /// [`Dims::input_shape`]); returns the node of `o`.
    pub(crate) fn token(&mut self, data: &[Vec<f64>], dims: &Dims, b: usize, t: usize) -> Result<usize, String> {
        if !self.keep {
            // Only the state carries over: start the token's tape from its value.
            let state = std::mem::replace(&mut self.tape.nodes[self.state].1, Val::Scalar(0.0));
            let extras: Vec<Val> =
                self.extras.iter().map(|&n| std::mem::replace(&mut self.tape.nodes[n].1, Val::Scalar(0.0))).collect();
            self.tape.nodes.clear();
            self.state = self.tape.push(Op::Leaf(Leaf::State), state);
            self.extras =
                extras.into_iter().enumerate().map(|(i, x)| self.tape.push(Op::Leaf(Leaf::Extra(i)), x)).collect();
            self.per_head.iter_mut().for_each(|p| *p = None);
        }
        let (k, v, h) = (self.k, self.v, self.head);
        let mut inputs = Vec::with_capacity(self.rule.inputs.len());
        for (i, (inp, d)) in self.rule.inputs.iter().zip(data).enumerate() {
            if let Some(n) = self.per_head[i] {
                inputs.push(n);
                continue;
            }
            let w = inp.width(k, v);
            let row = if inp.per_head { h } else { (b * dims.seq_len + t) * dims.heads + h };
            let x = d[row * w..(row + 1) * w].to_vec();
            let val = match inp.ty {
                Ty::VecK => Val::VecK(x),
                Ty::VecV => Val::VecV(x),
                _ => Val::Scalar(x[0]),
            };
            let n = self.tape.push(Op::Leaf(Leaf::Input { input: i, token: t }), val);
            if inp.per_head {
                self.per_head[i] = Some(n);
            }
            inputs.push(n);
        }
        self.inputs = inputs;
        let mut o = None;
        for s in &self.rule.stmts {
            let n = self.eval(&s.value)?;
            match (&s.target, self.tape.val(n)) {
                (Target::State, Val::Mat(_)) => self.state = n,
                (Target::Extra(i), Val::VecK(_) | Val::VecV(_)) => self.extras[*i] = n,
                (Target::Output, Val::VecV(_)) => o = Some(n),
                (Target::Local(i), _) => self.locals[*i] = Some(n),
                (t, val) => {
                    return Err(format!("statement assigns {val:?} to {t:?}: the checker should have refused it"))
                }
            }
        }
        o.ok_or_else(|| "the step never assigns `o`".to_string())
    }

    fn eval(&mut self, e: &Expr) -> Result<usize, String> {
        let (k, v) = (self.k, self.v);
        let n = match &e.kind {
            ExprKind::Num(x) => self.tape.push(Op::Leaf(Leaf::Constant), Val::Scalar(*x)),
            ExprKind::Input(i) => self.inputs[*i],
            ExprKind::Local(i) => self.locals[*i].ok_or("local read before it is assigned")?,
            ExprKind::State => self.state,
            ExprKind::Extra(i) => self.extras[*i],
            ExprKind::Read(_) => return Err("a canonical read inside a rule step".into()),
            ExprKind::Scale => self.tape.push(Op::Leaf(Leaf::Constant), Val::Scalar(self.scale)),
            ExprKind::Head => self.tape.push(Op::Leaf(Leaf::Constant), Val::Scalar(self.head as f64)),
            ExprKind::Unary(op, a) => {
                let a = self.eval(a)?;
                let val = map(self.tape.val(a).clone(), |x| op.apply(x));
                self.tape.push(Op::Unary(*op, a), val)
            }
            ExprKind::Binary(op, a, b) => {
                let (a, b) = (self.eval(a)?, self.eval(b)?);
                let val = binary(*op, self.tape.val(a).clone(), self.tape.val(b).clone(), k, v)?;
                self.tape.push(Op::Binary(*op, a, b), val)
            }
            ExprKind::Dot(a, b) => {
                let (a, b) = (self.eval(a)?, self.eval(b)?);
                let (x, y) = (vector(self.tape.val(a))?, vector(self.tape.val(b))?);
                let val = Val::Scalar(x.iter().zip(y).map(|(p, q)| p * q).sum());
                self.tape.push(Op::Dot(a, b), val)
            }
            ExprKind::Sum(a) => {
                let a = self.eval(a)?;
                let val = Val::Scalar(vector(self.tape.val(a))?.iter().sum());
                self.tape.push(Op::Sum(a), val)
            }
            ExprKind::L2Norm(a) => {
                let a = self.eval(a)?;
                let x = self.tape.val(a).clone();
                let n = vector(&x)?.iter().map(|y| y * y).sum::<f64>().sqrt();
                self.tape.push(Op::L2Norm(a), map(x, |y| y / n))
            }
            ExprKind::Outer(a, b) => {
                let (a, b) = (self.eval(a)?, self.eval(b)?);
                let (x, y) = (vector(self.tape.val(a))?, vector(self.tape.val(b))?);
                let val = Val::Mat(x.iter().flat_map(|p| y.iter().map(move |q| p * q)).collect());
                self.tape.push(Op::Outer(a, b), val)
            }
            ExprKind::Transpose(a) => {
                let a = self.eval(a)?;
                let val = match self.tape.val(a).clone() {
                    Val::Mat(m) => Val::MatT(m),
                    Val::MatT(m) => Val::Mat(m),
                    x => x,
                };
                self.tape.push(Op::Transpose(a), val)
            }
            ExprKind::MatMul(a, b) => {
                let (a, b) = (self.eval(a)?, self.eval(b)?);
                let val = matmul(self.tape.val(a), self.tape.val(b), k, v)?;
                self.tape.push(Op::MatMul(a, b), val)
            }
        };
        Ok(n)
    }
}

/// `a @ b` for the typed combinations the checker allows.
fn matmul(a: &Val, b: &Val, k: usize, v: usize) -> Result<Val, String> {
    Ok(match (a, b) {
        // S y and y S^T -> [K]
        (Val::Mat(m), Val::VecV(y)) | (Val::VecV(y), Val::MatT(m)) => {
            Val::VecK((0..k).map(|i| (0..v).map(|j| m[i * v + j] * y[j]).sum()).collect())
        }
        // S^T x and x S -> [V]
        (Val::MatT(m), Val::VecK(x)) | (Val::VecK(x), Val::Mat(m)) => {
            Val::VecV((0..v).map(|j| (0..k).map(|i| m[i * v + j] * x[i]).sum()).collect())
        }
        (Val::VecK(a), Val::VecK(b)) | (Val::VecV(a), Val::VecV(b)) => {
            Val::Scalar(a.iter().zip(b).map(|(x, y)| x * y).sum())
        }
        (a, b) => return Err(format!("cannot multiply {a:?} @ {b:?}: the checker should have refused it")),
    })
}

pub(crate) fn map(x: Val, f: impl Fn(f64) -> f64) -> Val {
    match x {
        Val::Scalar(a) => Val::Scalar(f(a)),
        Val::VecK(a) => Val::VecK(a.into_iter().map(f).collect()),
        Val::VecV(a) => Val::VecV(a.into_iter().map(f).collect()),
        Val::Mat(a) => Val::Mat(a.into_iter().map(f).collect()),
        Val::MatT(a) => Val::MatT(a.into_iter().map(f).collect()),
    }
}

pub(crate) fn vector(x: &Val) -> Result<&[f64], String> {
    match x {
        Val::VecK(a) | Val::VecV(a) => Ok(a),
        x => Err(format!("expected a vector, got {x:?}")),
    }
}

/// Elementwise with the rule's broadcasting: scalars broadcast everywhere, `[K]` over rows
/// of a matrix, `[V]` over its columns.
fn binary(op: BinaryOp, a: Val, b: Val, k: usize, v: usize) -> Result<Val, String> {
    use Val::*;
    let f = |x: f64, y: f64| op.apply(x, y);
    let zip = |a: Vec<f64>, b: Vec<f64>| a.iter().zip(&b).map(|(x, y)| f(*x, *y)).collect::<Vec<_>>();
    Ok(match (a, b) {
        (Scalar(x), Scalar(y)) => Scalar(f(x, y)),
        (Scalar(x), other) => map(other, |y| f(x, y)),
        (other, Scalar(y)) => map(other, |x| f(x, y)),
        (VecK(a), VecK(b)) => VecK(zip(a, b)),
        (VecV(a), VecV(b)) => VecV(zip(a, b)),
        (Mat(a), Mat(b)) => Mat(zip(a, b)),
        (VecK(r), Mat(m)) => Mat((0..k * v).map(|i| f(r[i / v], m[i])).collect()),
        (Mat(m), VecK(r)) => Mat((0..k * v).map(|i| f(m[i], r[i / v])).collect()),
        (VecV(c), Mat(m)) => Mat((0..k * v).map(|i| f(c[i % v], m[i])).collect()),
        (Mat(m), VecV(c)) => Mat((0..k * v).map(|i| f(m[i], c[i % v])).collect()),
        (a, b) => {
            return Err(format!("cannot combine {a:?} and {b:?} elementwise: the checker should have refused it"))
        }
    })
}
