//! The reference's gradient: reverse mode over the reference interpreter (`reference.rs`).
//!
//! The interpreter records every value a sequence computes on a tape (operation, operands,
//! value); this walks the tape backwards from the loss' cotangents, applying each operation's
//! vector-Jacobian product, and gathers the leaves' adjoints into the inputs' gradients. It
//! differentiates the rule as written (the typed statements), never the canonical form, so it
//! checks the compiler's derived backward as the forward reference checks the kernels.
//!
//! Loss convention (flash-linear-attention's tests): `L = sum(o * do) + sum(hT * dhT)`.
//! Gradients come in the inputs' own layouts; a per-head parameter's gradient is summed over
//! batch and time. Everything is f64.

use crate::ast::*;
use crate::reference::{initial_states, input_data, vector, Dims, Env, Leaf, Op, Outputs, Val};

/// The forward outputs and the gradient of the loss with respect to every input and `h0`.
#[derive(Clone, Debug)]
pub struct Gradients {
    pub outputs: Outputs,
    /// One per rule input, in declaration order, in the input's layout.
    pub inputs: Vec<Vec<f64>>,
    /// `dL/dh0` `[B, H, K, V]` (zeros in, zeros-state out when no `h0` was given: the gradient
    /// with respect to the zero state the run started from).
    pub dh0: Vec<f64>,
    /// `dL/d<name>0` `[B, H, D]` for each extra state, in [`Rule::states`] order.
    pub d_extra0: Vec<Vec<f64>>,
}

/// Runs the rule forward and backward. `d_o` is `dL/do` `[B, T, H, V]`; `d_ht` is `dL/dhT`
/// `[B, H, K, V]` (None: zero). The inputs and `h0` as for [`crate::reference::run`]; an
/// extra state's final cotangent is `input("d<name>T")` (`[B, H, D]`, absent: zero), so the
/// loss gains `sum(<name>T * d<name>T)`.
pub fn grad(
    rule: &Rule,
    dims: Dims,
    scale: f64,
    input: &dyn Fn(&str) -> Option<Vec<f64>>,
    h0: Option<&[f64]>,
    d_o: &[f64],
    d_ht: Option<&[f64]>,
) -> Result<Gradients, String> {
    grad_in(Arithmetic::F64, rule, dims, scale, input, h0, d_o, d_ht)
}

/// The arithmetic of the forward the gradient goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arithmetic {
    /// f64 throughout (the reference).
    F64,
    /// Every value of the forward rounded to f32 as it is computed (constants and `scale`
    /// included), the backward in f64: how far f32 arithmetic alone moves the gradient of a
    /// rule on given inputs, which bounds from below what any f32 backward can reach (a decay
    /// of 0.9 is 3e-8 off in f32, and `dh0` from `dhT` through 200 of them 6e-6 off).
    F32Forward,
}

/// [`grad`] in the given arithmetic.
#[allow(clippy::too_many_arguments)]
pub fn grad_in(
    arithmetic: Arithmetic,
    rule: &Rule,
    dims: Dims,
    scale: f64,
    input: &dyn Fn(&str) -> Option<Vec<f64>>,
    h0: Option<&[f64]>,
    d_o: &[f64],
    d_ht: Option<&[f64]>,
) -> Result<Gradients, String> {
    let Dims { batch, seq_len, heads, k, v } = dims;
    let data = input_data(rule, &dims, input)?;
    if d_o.len() != batch * seq_len * heads * v {
        return Err(format!("do has {} elements, expected {}", d_o.len(), batch * seq_len * heads * v));
    }
    let kv = k * v;
    if let Some(d) = d_ht.filter(|d| d.len() != batch * heads * kv) {
        return Err(format!("dhT has {} elements, expected {}", d.len(), batch * heads * kv));
    }
    let extras0 = initial_states(rule, &dims, input)?;
    let d_extra_t: Vec<Option<Vec<f64>>> = rule
        .states
        .iter()
        .map(|s| {
            let name = format!("d{}", s.final_name());
            let want = batch * heads * s.width(k, v);
            match input(&name) {
                Some(d) if d.len() != want => Err(format!("{name} has {} elements, expected {want}", d.len())),
                d => Ok(d),
            }
        })
        .collect::<Result<_, _>>()?;
    let mut out = Outputs::zeros(rule, &dims);
    let mut grads: Vec<Vec<f64>> = data.iter().map(|d| vec![0.0; d.len()]).collect();
    let mut dh0 = vec![0.0; batch * heads * kv];
    let mut d_extra0: Vec<Vec<f64>> = out.extra.iter().map(|x| vec![0.0; x.len()]).collect();
    for b in 0..batch {
        for h in 0..heads {
            let mut env = Env::new(rule, &dims, scale, (b, h), (h0, &extras0), true);
            env.tape.round_to_f32 = arithmetic == Arithmetic::F32Forward;
            let mut outs = Vec::with_capacity(seq_len);
            for t in 0..seq_len {
                let o = env.token(&data, &dims, b, t)?;
                out.o[((b * seq_len + t) * heads + h) * v..][..v].copy_from_slice(env.tape.val(o).data());
                outs.push(o);
            }
            out.store_states(&env, &dims, (b, h));

            // Seeds: dL/do_t at every output node, dL/dhT at the final state's.
            let tape = &env.tape;
            let mut adj: Vec<Option<Vec<f64>>> = vec![None; tape.nodes.len()];
            for (t, &o) in outs.iter().enumerate() {
                let at = ((b * seq_len + t) * heads + h) * v;
                add(&mut adj, tape, o, |g| g.iter_mut().zip(&d_o[at..at + v]).for_each(|(x, y)| *x += y));
            }
            if let Some(d) = d_ht {
                let at = (b * heads + h) * kv;
                add(&mut adj, tape, env.state, |g| g.iter_mut().zip(&d[at..at + kv]).for_each(|(x, y)| *x += y));
            }
            for (d, &n) in d_extra_t.iter().zip(&env.extras) {
                if let Some(d) = d {
                    let w = tape.val(n).data().len();
                    let at = (b * heads + h) * w;
                    add(&mut adj, tape, n, |g| g.iter_mut().zip(&d[at..at + w]).for_each(|(x, y)| *x += y));
                }
            }
            for n in (0..tape.nodes.len()).rev() {
                let Some(g) = adj[n].take() else { continue };
                match tape.nodes[n].0 {
                    Op::Leaf(Leaf::Input { input, token }) => {
                        let inp = &rule.inputs[input];
                        let w = inp.width(k, v);
                        let row = if inp.per_head { h } else { (b * seq_len + token) * heads + h };
                        grads[input][row * w..(row + 1) * w].iter_mut().zip(&g).for_each(|(x, y)| *x += y);
                    }
                    Op::Leaf(Leaf::State) => {
                        dh0[(b * heads + h) * kv..][..kv].iter_mut().zip(&g).for_each(|(x, y)| *x += y);
                    }
                    Op::Leaf(Leaf::Extra(i)) => {
                        let w = g.len();
                        d_extra0[i][(b * heads + h) * w..][..w].iter_mut().zip(&g).for_each(|(x, y)| *x += y);
                    }
                    Op::Leaf(Leaf::Constant) => {}
                    op => backprop(op, n, &g, tape, &mut adj, (k, v))?,
                }
            }
        }
    }
    Ok(Gradients { outputs: out, inputs: grads, dh0, d_extra0 })
}

/// Adds to node `n`'s adjoint (zero when it has none yet) with `f`.
fn add(adj: &mut [Option<Vec<f64>>], tape: &crate::reference::Tape, n: usize, f: impl FnOnce(&mut Vec<f64>)) {
    let g = adj[n].get_or_insert_with(|| vec![0.0; tape.val(n).data().len()]);
    f(g);
}

/// Node `n`'s adjoint `g` through its operation into its operands' adjoints.
fn backprop(
    op: Op,
    n: usize,
    g: &[f64],
    tape: &crate::reference::Tape,
    adj: &mut [Option<Vec<f64>>],
    (k, v): (usize, usize),
) -> Result<(), String> {
    let val = |m: usize| tape.val(m).data();
    match op {
        Op::Leaf(_) => {}
        Op::Unary(f, a) => {
            let (x, y) = (val(a), val(n));
            let d: Vec<f64> = x.iter().zip(y).zip(g).map(|((&x, &y), &g)| times(g, unary_slope(f, x, y))).collect();
            add(adj, tape, a, |ga| ga.iter_mut().zip(&d).for_each(|(p, q)| *p += q));
        }
        Op::Binary(f, a, b) => {
            let (xa, xb, y) = (tape.val(a), tape.val(b), val(n));
            let index = broadcast(xa, xb, (k, v))?;
            let (mut ga, mut gb) = (vec![0.0; xa.data().len()], vec![0.0; xb.data().len()]);
            for (e, &ge) in g.iter().enumerate() {
                let (ia, ib) = index(e);
                let (p, q) = binary_slopes(f, xa.data()[ia], xb.data()[ib], y[e]);
                ga[ia] += times(ge, p);
                gb[ib] += times(ge, q);
            }
            add(adj, tape, a, |x| x.iter_mut().zip(&ga).for_each(|(p, q)| *p += q));
            add(adj, tape, b, |x| x.iter_mut().zip(&gb).for_each(|(p, q)| *p += q));
        }
        Op::Dot(a, b) => {
            let (x, y) = (vector(tape.val(a))?.to_vec(), vector(tape.val(b))?.to_vec());
            add(adj, tape, a, |ga| ga.iter_mut().zip(&y).for_each(|(p, q)| *p += g[0] * q));
            add(adj, tape, b, |gb| gb.iter_mut().zip(&x).for_each(|(p, q)| *p += g[0] * q));
        }
        Op::Sum(a) => add(adj, tape, a, |ga| ga.iter_mut().for_each(|p| *p += g[0])),
        Op::L2Norm(a) => {
            // y = x / |x|: dx = (dy - (dy . y) y) / |x|
            let (x, y) = (val(a), val(n));
            let norm = x.iter().map(|p| p * p).sum::<f64>().sqrt();
            let gy: f64 = g.iter().zip(y).map(|(p, q)| p * q).sum();
            let d: Vec<f64> = g.iter().zip(y).map(|(&gi, &yi)| (gi - gy * yi) / norm).collect();
            add(adj, tape, a, |ga| ga.iter_mut().zip(&d).for_each(|(p, q)| *p += q));
        }
        Op::Outer(a, b) => {
            // M = x y^T: dx_i = sum_j g_ij y_j, dy_j = sum_i g_ij x_i
            let (x, y) = (vector(tape.val(a))?.to_vec(), vector(tape.val(b))?.to_vec());
            let q = y.len();
            let dx: Vec<f64> = (0..x.len()).map(|i| (0..q).map(|j| g[i * q + j] * y[j]).sum()).collect();
            let dy: Vec<f64> = (0..q).map(|j| (0..x.len()).map(|i| g[i * q + j] * x[i]).sum()).collect();
            add(adj, tape, a, |ga| ga.iter_mut().zip(&dx).for_each(|(p, r)| *p += r));
            add(adj, tape, b, |gb| gb.iter_mut().zip(&dy).for_each(|(p, r)| *p += r));
        }
        // A transpose shares its operand's storage: the adjoint passes through as it is.
        Op::Transpose(a) => add(adj, tape, a, |ga| ga.iter_mut().zip(g).for_each(|(p, q)| *p += q)),
        Op::MatMul(a, b) => {
            let (ma, mb) = (tape.val(a), tape.val(b));
            match (ma, mb) {
                // r_i = sum_j m_ij y_j (S y, y S^T): dm_ij = g_i y_j, dy_j = sum_i g_i m_ij
                (Val::Mat(m), Val::VecV(y)) | (Val::VecV(y), Val::MatT(m)) => {
                    let dm: Vec<f64> = (0..k * v).map(|e| g[e / v] * y[e % v]).collect();
                    let dy: Vec<f64> = (0..v).map(|j| (0..k).map(|i| g[i] * m[i * v + j]).sum()).collect();
                    let (mi, yi) = if matches!(ma, Val::Mat(_)) { (a, b) } else { (b, a) };
                    add(adj, tape, mi, |x| x.iter_mut().zip(&dm).for_each(|(p, q)| *p += q));
                    add(adj, tape, yi, |x| x.iter_mut().zip(&dy).for_each(|(p, q)| *p += q));
                }
                // r_j = sum_i m_ij x_i (S^T x, x S): dm_ij = x_i g_j, dx_i = sum_j m_ij g_j
                (Val::MatT(m), Val::VecK(x)) | (Val::VecK(x), Val::Mat(m)) => {
                    let dm: Vec<f64> = (0..k * v).map(|e| x[e / v] * g[e % v]).collect();
                    let dx: Vec<f64> = (0..k).map(|i| (0..v).map(|j| m[i * v + j] * g[j]).sum()).collect();
                    let (mi, xi) = if matches!(ma, Val::MatT(_)) { (a, b) } else { (b, a) };
                    add(adj, tape, mi, |x| x.iter_mut().zip(&dm).for_each(|(p, q)| *p += q));
                    add(adj, tape, xi, |x| x.iter_mut().zip(&dx).for_each(|(p, q)| *p += q));
                }
                (Val::VecK(x), Val::VecK(y)) | (Val::VecV(x), Val::VecV(y)) => {
                    let (x, y) = (x.clone(), y.clone());
                    add(adj, tape, a, |ga| ga.iter_mut().zip(&y).for_each(|(p, q)| *p += g[0] * q));
                    add(adj, tape, b, |gb| gb.iter_mut().zip(&x).for_each(|(p, q)| *p += g[0] * q));
                }
                (x, y) => {
                    return Err(format!("cannot differentiate {x:?} @ {y:?}: the checker should have refused it"))
                }
            }
        }
    }
    Ok(())
}

/// `g * slope`, 0 where no adjoint reaches (g = 0): the branch a `where` did not take may
/// have a non-finite slope (log or sqrt of a negative number), and it must not turn the
/// zero it receives into NaN.
fn times(g: f64, slope: f64) -> f64 {
    if g == 0.0 {
        0.0
    } else {
        g * slope
    }
}

/// `f'(x)`, given `y = f(x)`.
fn unary_slope(f: UnaryOp, x: f64, y: f64) -> f64 {
    match f {
        UnaryOp::Neg => -1.0,
        UnaryOp::Exp => y,
        UnaryOp::Exp2 => y * std::f64::consts::LN_2,
        UnaryOp::Log => 1.0 / x,
        UnaryOp::Sigmoid => y * (1.0 - y),
        UnaryOp::Softplus => sigmoid(x),
        UnaryOp::Silu => {
            let s = sigmoid(x);
            s + x * s * (1.0 - s)
        }
        UnaryOp::Sqrt => 0.5 / y,
        UnaryOp::Abs => sign(x),
        UnaryOp::Tanh => 1.0 - y * y,
    }
}

/// -1, 0 or 1 (0 at ±0, as the subgradient `abs` takes there).
fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// `(df/da, df/db)` at `(a, b)`, given `y = f(a, b)`.
fn binary_slopes(f: BinaryOp, a: f64, b: f64, y: f64) -> (f64, f64) {
    match f {
        BinaryOp::Add => (1.0, 1.0),
        BinaryOp::Sub => (1.0, -1.0),
        BinaryOp::Mul => (b, a),
        BinaryOp::Div => (1.0 / b, -a / (b * b)),
        // d(a^b)/db = a^b ln a, which tends to 0 where a^b does (a = 0, b > 0).
        BinaryOp::Pow => (b * a.powf(b - 1.0), if y == 0.0 { 0.0 } else { y * a.ln() }),
        // The selected operand takes the slope; a tie splits it (as torch's maximum/minimum).
        BinaryOp::Min | BinaryOp::Max => {
            let a_wins = if f == BinaryOp::Max { a > b } else { a < b };
            match (a == b, a_wins) {
                (true, _) => (0.5, 0.5),
                (false, true) => (1.0, 0.0),
                (false, false) => (0.0, 1.0),
            }
        }
        // Step functions: flat wherever they are differentiable.
        BinaryOp::Lt | BinaryOp::Le | BinaryOp::Gt | BinaryOp::Ge | BinaryOp::Equal | BinaryOp::NotEqual => (0.0, 0.0),
        BinaryOp::Keep => (0.0, if a != 0.0 { 1.0 } else { 0.0 }),
    }
}

/// For element `e` of an elementwise result of `a` and `b`, the elements of `a` and `b` it was
/// computed from (the interpreter's broadcasting: scalars everywhere, `[K]` over a matrix's
/// rows, `[V]` over its columns).
fn broadcast(a: &Val, b: &Val, (_, v): (usize, usize)) -> Result<impl Fn(usize) -> (usize, usize), String> {
    use Val::*;
    #[derive(Clone, Copy)]
    enum Map {
        Same,
        Zero,
        Row,
        Col,
    }
    let (ma, mb) = match (a, b) {
        (Scalar(_), _) => (Map::Zero, Map::Same),
        (_, Scalar(_)) => (Map::Same, Map::Zero),
        (VecK(_), VecK(_)) | (VecV(_), VecV(_)) | (Mat(_), Mat(_)) => (Map::Same, Map::Same),
        (VecK(_), Mat(_)) => (Map::Row, Map::Same),
        (Mat(_), VecK(_)) => (Map::Same, Map::Row),
        (VecV(_), Mat(_)) => (Map::Col, Map::Same),
        (Mat(_), VecV(_)) => (Map::Same, Map::Col),
        (a, b) => return Err(format!("cannot differentiate {a:?} and {b:?} elementwise")),
    };
    let at = move |m: Map, e: usize| match m {
        Map::Same => e,
        Map::Zero => 0,
        Map::Row => e / v,
        Map::Col => e % v,
    };
    Ok(move |e| (at(ma, e), at(mb, e)))
}
