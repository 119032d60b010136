//! The reference: the checked rule interpreted token by token in f64.
//!
//! It reads the typed statements directly and never the canonical form, so that it can check
//! both the canonical form and every kernel generated from it.

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
}

/// One value of the step. Matrices are K x V row-major; `MatT` shares that storage.
#[derive(Clone, Debug)]
enum Val {
    Scalar(f64),
    VecK(Vec<f64>),
    VecV(Vec<f64>),
    Mat(Vec<f64>),
    MatT(Vec<f64>),
}

struct Env<'a> {
    rule: &'a Rule,
    k: usize,
    v: usize,
    scale: f64,
    head: usize,
    /// Input values of the current token, by input index.
    inputs: Vec<Val>,
    locals: Vec<Option<Val>>,
    state: Vec<f64>,
}

/// Runs the rule over every batch and head. `input(name)` gives each input's tensor data in
/// the layout of [`Dims::input_shape`] (the caller has checked the shapes); `h0` is the
/// initial state or zeros.
pub fn run(
    rule: &Rule,
    dims: Dims,
    scale: f64,
    input: &dyn Fn(&str) -> Option<Vec<f64>>,
    h0: Option<&[f64]>,
) -> Result<Outputs, String> {
    let Dims { batch, seq_len, heads, k, v } = dims;
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
    let mut out = Outputs { o: vec![0.0; batch * seq_len * heads * v], ht: vec![0.0; batch * heads * k * v] };
    for b in 0..batch {
        for h in 0..heads {
            let mut env = Env {
                rule,
                k,
                v,
                scale,
                head: h,
                inputs: vec![],
                locals: vec![None; rule.locals.len()],
                state: match h0 {
                    Some(s) => s[(b * heads + h) * k * v..][..k * v].to_vec(),
                    None => vec![0.0; k * v],
                },
            };
            for t in 0..seq_len {
                env.inputs = rule
                    .inputs
                    .iter()
                    .zip(&data)
                    .map(|(inp, d)| {
                        let w = inp.width(k, v);
                        let row = if inp.per_head { h } else { (b * seq_len + t) * heads + h };
                        let x = d[row * w..(row + 1) * w].to_vec();
                        match inp.ty {
                            Ty::VecK => Val::VecK(x),
                            Ty::VecV => Val::VecV(x),
                            _ => Val::Scalar(x[0]),
                        }
                    })
                    .collect();
                let o = env.step()?;
                out.o[((b * seq_len + t) * heads + h) * v..][..v].copy_from_slice(&o);
            }
            out.ht[(b * heads + h) * k * v..][..k * v].copy_from_slice(&env.state);
        }
    }
    Ok(out)
}

impl Env<'_> {
    /// Executes the statements for one token; returns `o`.
    fn step(&mut self) -> Result<Vec<f64>, String> {
        let mut o = None;
        for s in &self.rule.stmts {
            let val = self.eval(&s.value)?;
            match (&s.target, val) {
                (Target::State, Val::Mat(m)) => self.state = m,
                (Target::Output, Val::VecV(x)) => o = Some(x),
                (Target::Local(i), val) => self.locals[*i] = Some(val),
                (t, val) => {
                    return Err(format!("statement assigns {val:?} to {t:?}: the checker should have refused it"))
                }
            }
        }
        o.ok_or_else(|| "the step never assigns `o`".to_string())
    }

    fn eval(&self, e: &Expr) -> Result<Val, String> {
        let (k, v) = (self.k, self.v);
        Ok(match &e.kind {
            ExprKind::Num(x) => Val::Scalar(*x),
            ExprKind::Input(i) => self.inputs[*i].clone(),
            ExprKind::Local(i) => self.locals[*i].clone().ok_or("local read before it is assigned")?,
            ExprKind::State => Val::Mat(self.state.clone()),
            ExprKind::Scale => Val::Scalar(self.scale),
            ExprKind::Head => Val::Scalar(self.head as f64),
            ExprKind::Unary(op, a) => map(self.eval(a)?, |x| op.apply(x)),
            ExprKind::Binary(op, a, b) => binary(*op, self.eval(a)?, self.eval(b)?, k, v)?,
            ExprKind::Dot(a, b) => {
                let (a, b) = (vector(self.eval(a)?)?, vector(self.eval(b)?)?);
                Val::Scalar(a.iter().zip(&b).map(|(x, y)| x * y).sum())
            }
            ExprKind::Sum(a) => Val::Scalar(vector(self.eval(a)?)?.iter().sum()),
            ExprKind::L2Norm(a) => {
                let x = self.eval(a)?;
                let n = vector(x.clone())?.iter().map(|y| y * y).sum::<f64>().sqrt();
                map(x, |y| y / n)
            }
            ExprKind::Outer(a, b) => {
                let (a, b) = (vector(self.eval(a)?)?, vector(self.eval(b)?)?);
                Val::Mat(a.iter().flat_map(|x| b.iter().map(move |y| x * y)).collect())
            }
            ExprKind::Transpose(a) => match self.eval(a)? {
                Val::Mat(m) => Val::MatT(m),
                Val::MatT(m) => Val::Mat(m),
                x => x,
            },
            ExprKind::MatMul(a, b) => match (self.eval(a)?, self.eval(b)?) {
                // S y -> [K]
                (Val::Mat(m), Val::VecV(y)) => {
                    Val::VecK((0..k).map(|i| (0..v).map(|j| m[i * v + j] * y[j]).sum()).collect())
                }
                // S^T x -> [V]
                (Val::MatT(m), Val::VecK(x)) | (Val::VecK(x), Val::Mat(m)) => {
                    Val::VecV((0..v).map(|j| (0..k).map(|i| m[i * v + j] * x[i]).sum()).collect())
                }
                (Val::VecV(y), Val::MatT(m)) => {
                    Val::VecK((0..k).map(|i| (0..v).map(|j| m[i * v + j] * y[j]).sum()).collect())
                }
                (Val::VecK(a), Val::VecK(b)) | (Val::VecV(a), Val::VecV(b)) => {
                    Val::Scalar(a.iter().zip(&b).map(|(x, y)| x * y).sum())
                }
                (a, b) => return Err(format!("cannot multiply {a:?} @ {b:?}: the checker should have refused it")),
            },
        })
    }
}

fn map(x: Val, f: impl Fn(f64) -> f64) -> Val {
    match x {
        Val::Scalar(a) => Val::Scalar(f(a)),
        Val::VecK(a) => Val::VecK(a.into_iter().map(f).collect()),
        Val::VecV(a) => Val::VecV(a.into_iter().map(f).collect()),
        Val::Mat(a) => Val::Mat(a.into_iter().map(f).collect()),
        Val::MatT(a) => Val::MatT(a.into_iter().map(f).collect()),
    }
}

fn vector(x: Val) -> Result<Vec<f64>, String> {
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
