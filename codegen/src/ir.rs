//! The tile IR: target-neutral kernels as operations on small static-shape tiles.
//!
//! A [`Kernel`] runs once per grid point (batch index `b`, head index `h`) with the sequence
//! length `T` known only at run time. Its body is a list of [`Stmt`]s: `Let` binds a new tile
//! (SSA: every value is written once), `Store` writes a tile to an output tensor, and `Loop`
//! runs a body `count` times carrying tiles (the state) from one iteration to the next.
//!
//! Tiles are 2-D (`rows x cols`), f32 or f64, with shapes fixed when the kernel is built.
//! Only the sequence tail is dynamic: loads and stores take a `valid_rows` index expression
//! and treat rows at or past it as absent (loads fill them with 0, stores skip them).
//!
//! Semantics are defined by the interpreter in `interp.rs`; every backend must agree with it.

use std::fmt;

/// Element type of a tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F64,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
        }
    }
}

/// Element type of a tensor in memory; the runtime owns it, as part of the launch
/// metadata's format.
pub use chunkc_runtime::artifact::ElemType;

/// Static shape and dtype of a tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TileTy {
    pub rows: usize,
    pub cols: usize,
    pub dtype: DType,
}

impl TileTy {
    pub fn f32(rows: usize, cols: usize) -> TileTy {
        TileTy { rows, cols, dtype: DType::F32 }
    }
    pub fn f64(rows: usize, cols: usize) -> TileTy {
        TileTy { rows, cols, dtype: DType::F64 }
    }
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A tile value (index into [`Kernel::values`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub u32);

/// Run-time integer variables a kernel can read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IdxVar {
    /// Batch index of this grid point.
    Batch,
    /// Head index of this grid point.
    Head,
    /// Sequence length T.
    SeqLen,
    /// Iteration counter of the enclosing `Loop` (0-based). Loops do not nest.
    Iter,
    /// V-tile of this grid point (0 unless the kernel splits V: see [`Kernel::vtiles`]).
    VTile,
}

/// Integer index expressions (i64 arithmetic), evaluated at run time.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Idx {
    Const(i64),
    Var(IdxVar),
    Add(Box<Idx>, Box<Idx>),
    Sub(Box<Idx>, Box<Idx>),
    Mul(Box<Idx>, Box<Idx>),
    Min(Box<Idx>, Box<Idx>),
    /// Ceiling division by a positive constant.
    CeilDiv(Box<Idx>, i64),
}

impl Idx {
    pub fn c(v: i64) -> Idx {
        Idx::Const(v)
    }
    pub fn var(v: IdxVar) -> Idx {
        Idx::Var(v)
    }
    #[allow(clippy::should_implement_trait)]
    pub fn add(self, o: Idx) -> Idx {
        Idx::Add(Box::new(self), Box::new(o))
    }
    #[allow(clippy::should_implement_trait)]
    pub fn sub(self, o: Idx) -> Idx {
        Idx::Sub(Box::new(self), Box::new(o))
    }
    #[allow(clippy::should_implement_trait)]
    pub fn mul(self, o: Idx) -> Idx {
        Idx::Mul(Box::new(self), Box::new(o))
    }
    pub fn min(self, o: Idx) -> Idx {
        Idx::Min(Box::new(self), Box::new(o))
    }
    pub fn ceil_div(self, d: i64) -> Idx {
        Idx::CeilDiv(Box::new(self), d)
    }

    /// Whether the expression reads variable `v`.
    pub fn uses(&self, v: IdxVar) -> bool {
        match self {
            Idx::Var(x) => *x == v,
            Idx::Const(_) => false,
            Idx::Add(a, b) | Idx::Sub(a, b) | Idx::Mul(a, b) | Idx::Min(a, b) => a.uses(v) || b.uses(v),
            Idx::CeilDiv(a, _) => a.uses(v),
        }
    }

    /// Evaluates with the given variable values.
    pub fn eval(&self, var: &dyn Fn(IdxVar) -> i64) -> i64 {
        match self {
            Idx::Const(c) => *c,
            Idx::Var(v) => var(*v),
            Idx::Add(a, b) => a.eval(var) + b.eval(var),
            Idx::Sub(a, b) => a.eval(var) - b.eval(var),
            Idx::Mul(a, b) => a.eval(var) * b.eval(var),
            Idx::Min(a, b) => a.eval(var).min(b.eval(var)),
            Idx::CeilDiv(a, d) => {
                let x = a.eval(var);
                (x + d - 1).div_euclid(*d)
            }
        }
    }
}

/// Elementwise unary functions. On f32 tiles each result is rounded to f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnOp {
    Neg,
    Exp,
    Exp2,
    Log,
    Sigmoid,
    Softplus,
    Silu,
    Sqrt,
    Recip,
    Abs,
    Tanh,
}

impl UnOp {
    /// The function in f64: the definition every backend's version is held to. Sigmoid and
    /// softplus take their stable branches (no overflow for large |x|); softplus is x above
    /// 20 and e^x below -20, as the rule language defines it.
    pub fn eval(self, x: f64) -> f64 {
        use chunkc_runtime::cpu_support::{sigmoid, silu, softplus};
        match self {
            UnOp::Neg => -x,
            UnOp::Exp => x.exp(),
            UnOp::Exp2 => x.exp2(),
            UnOp::Log => x.ln(),
            UnOp::Sigmoid => sigmoid(x),
            UnOp::Softplus => softplus(x),
            UnOp::Silu => silu(x),
            UnOp::Sqrt => x.sqrt(),
            UnOp::Recip => 1.0 / x,
            UnOp::Abs => x.abs(),
            UnOp::Tanh => x.tanh(),
        }
    }
}

/// Elementwise binary functions with broadcasting: each dimension of the two operands is
/// equal or 1, and a dimension of 1 repeats. Both operands have the same dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    /// NaN when either operand is NaN (as `Min`).
    Max,
    Min,
    /// 1 where `a < b`, else 0 (0 when either is NaN); `Le` and `Equal` alike.
    Lt,
    Le,
    Equal,
    /// `b` where `a != 0`, else 0: the branch not taken never reaches the result, even as
    /// a NaN or an infinity (a `where` is two of these added).
    Keep,
}

impl BinOp {
    /// The function in f64, the definition every backend is held to.
    pub fn eval(self, a: f64, b: f64) -> f64 {
        let truth = |c: bool| if c { 1.0 } else { 0.0 };
        match self {
            BinOp::Add => a + b,
            BinOp::Sub => a - b,
            BinOp::Mul => a * b,
            BinOp::Div => a / b,
            BinOp::Pow => a.powf(b),
            BinOp::Max | BinOp::Min if a.is_nan() || b.is_nan() => f64::NAN,
            BinOp::Max => a.max(b),
            BinOp::Min => a.min(b),
            BinOp::Lt => truth(a < b),
            BinOp::Le => truth(a <= b),
            BinOp::Equal => truth(a == b),
            BinOp::Keep => {
                if a != 0.0 {
                    b
                } else {
                    0.0
                }
            }
        }
    }
}

/// Which elements `Mask` replaces with its fill value.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum MaskKind {
    /// Keep element (i, j) when j <= i (`strict`: j < i); replace the rest.
    Tril { strict: bool },
    /// Keep rows i < the index; replace rows at or past it (the sequence tail).
    RowsBefore(Idx),
}

/// The operations that define a tile. Each names its operands by [`ValueId`].
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Reads `rows x cols` elements of type `elem` into an f32 tile (16-bit types widen
    /// exactly): element (i, j) is at `base + i*row_stride + j*col_stride` (in elements) of
    /// parameter `param`. Rows at or past `valid_rows` are not read and are 0 in the tile.
    Load {
        elem: ElemType,
        param: usize,
        base: Idx,
        row_stride: i64,
        col_stride: i64,
        rows: usize,
        cols: usize,
        valid_rows: Idx,
    },
    /// A tile filled with one value.
    Const {
        value: f64,
        ty: TileTy,
    },
    /// A 1 x 1 f32 tile holding an index expression's value.
    IdxValue(Idx),
    Unary {
        op: UnOp,
        x: ValueId,
    },
    Binary {
        op: BinOp,
        a: ValueId,
        b: ValueId,
    },
    /// Converts to another dtype (f64 -> f32 rounds to nearest).
    Cast {
        x: ValueId,
        dtype: DType,
    },
    /// Matrix product of f32 tiles, accumulated in f32: `op(a) @ op(b) (+ acc)`, where
    /// op transposes when the flag is set. `op(a)` is m x k, `op(b)` is k x n, acc m x n.
    Dot {
        a: ValueId,
        b: ValueId,
        ta: bool,
        tb: bool,
        acc: Option<ValueId>,
    },
    /// Cumulative sum down the rows (over i, for each column): inclusive
    /// `out[i] = sum_{s<=i} x[s]`, exclusive `out[i] = sum_{s<i} x[s]`. Same dtype.
    Cumsum {
        x: ValueId,
        exclusive: bool,
    },
    /// Sum of each row: `rows x cols -> rows x 1`. Same dtype.
    RowSum {
        x: ValueId,
    },
    /// Rows `start .. start+len` of a tile (a view: no copy is needed).
    Rows {
        x: ValueId,
        start: usize,
        len: usize,
    },
    /// The parts stacked by rows, first on top: tiles with one column count and dtype (the
    /// adjoint of several row slices of one value, assembled once).
    Concat {
        parts: Vec<ValueId>,
    },
    /// The transpose (a view: no copy is needed).
    Transpose {
        x: ValueId,
    },
    /// Replaces the masked-out elements with `fill` (may be -inf). Same dtype.
    Mask {
        x: ValueId,
        mask: MaskKind,
        fill: f64,
    },
    /// Gated scores of a diagonal block: `out[i, j] = sum_c a[i,c] * b[j,c] *
    /// exp(ga[i,c] - gb[j,c])` for j <= i (`strict`: j < i), else 0. `a`, `b` f32 `n x c`;
    /// `ga`, `gb` `n x c` of one dtype (the exponent is formed in that dtype, the exp and
    /// the sum in f32). Only the kept elements are evaluated, so exponents above the
    /// diagonal may be positive without overflow.
    GatedDot {
        a: ValueId,
        ga: ValueId,
        b: ValueId,
        gb: ValueId,
        strict: bool,
    },
    /// The gated product the reverse of [`Op::GatedDot`] needs: with `m` f32 n x n and `x`,
    /// `gx`, `gy` n x c (`x` f32, the gates of one dtype),
    /// `out[i, c] = sum_{j <= i} m[i, j] x[j, c] exp(gy[i, c] - gx[j, c])` (`strict`: j < i),
    /// or with `transposed`, `out[j, c] = sum_{i >= j} m[i, j] x[i, c] exp(gx[i, c] - gy[j, c])`
    /// (`strict`: i > j). Only those pairs' exponents are formed (as in `GatedDot`).
    GatedMatMul {
        m: ValueId,
        x: ValueId,
        gx: ValueId,
        gy: ValueId,
        transposed: bool,
        strict: bool,
    },
    /// Forward substitution: the `X` with `(I + strict_lower(l)) X = b`, for `l` n x n and `b`
    /// n x m, f32. The diagonal and upper triangle of `l` are ignored.
    SolveUnitLower {
        l: ValueId,
        b: ValueId,
    },
}

impl Op {
    /// Operand values, in order.
    pub fn operands(&self) -> Vec<ValueId> {
        self.clone().operands_mut().into_iter().map(|v| *v).collect()
    }

    /// The operand fields, in the order of [`Op::operands`], for renaming them.
    pub fn operands_mut(&mut self) -> Vec<&mut ValueId> {
        match self {
            Op::Load { .. } | Op::Const { .. } | Op::IdxValue(_) => vec![],
            Op::Unary { x, .. }
            | Op::Cast { x, .. }
            | Op::Cumsum { x, .. }
            | Op::RowSum { x }
            | Op::Rows { x, .. }
            | Op::Transpose { x }
            | Op::Mask { x, .. } => vec![x],
            Op::Binary { a, b, .. } => vec![a, b],
            Op::Dot { a, b, acc, .. } => {
                let mut v = vec![a, b];
                v.extend(acc.as_mut());
                v
            }
            Op::GatedDot { a, ga, b, gb, .. } => vec![a, ga, b, gb],
            Op::GatedMatMul { m, x, gx, gy, .. } => vec![m, x, gx, gy],
            Op::SolveUnitLower { l, b } => vec![l, b],
            Op::Concat { parts } => parts.iter_mut().collect(),
        }
    }

    /// True for ops whose result is a view of their operand's storage.
    pub fn is_view(&self) -> bool {
        matches!(self, Op::Rows { .. } | Op::Transpose { .. })
    }

    /// A short name of the op's kind (`load`, `dot`, ...), for comments and reports.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Load { .. } => "load",
            Op::Const { .. } => "const",
            Op::IdxValue(_) => "index value",
            Op::Unary { .. } => "unary",
            Op::Binary { .. } => "binary",
            Op::Cast { .. } => "cast",
            Op::Dot { .. } => "dot",
            Op::Cumsum { .. } => "cumsum",
            Op::RowSum { .. } => "row sum",
            Op::Rows { .. } => "rows (view)",
            Op::Transpose { .. } => "transpose (view)",
            Op::Mask { .. } => "mask",
            Op::GatedDot { .. } => "gated dot",
            Op::GatedMatMul { .. } => "gated matmul",
            Op::SolveUnitLower { .. } => "solve unit lower",
            Op::Concat { .. } => "concat",
        }
    }
}

/// A statement of the kernel body.
#[derive(Clone, Debug, PartialEq)]
pub enum Stmt {
    Let {
        id: ValueId,
        op: Op,
    },
    /// Writes f32 tile `value` to parameter `param`: element (i, j) goes to `base +
    /// i*row_stride + j*col_stride`; rows at or past `valid_rows` are skipped. f64 tiles are
    /// rounded to f32.
    Store {
        value: ValueId,
        param: usize,
        base: Idx,
        row_stride: i64,
        col_stride: i64,
        valid_rows: Idx,
    },
    /// Runs `body` `count` times (`Iter` = 0, 1, ...). `carried[i] = (inner, init)`: `inner`
    /// holds `init` in the first iteration and `yields[i]` of the previous one after that.
    /// After the loop `results[i]` holds the last `yields[i]` (or `init` if `count <= 0`).
    Loop {
        count: Idx,
        carried: Vec<(ValueId, ValueId)>,
        body: Vec<Stmt>,
        yields: Vec<ValueId>,
        results: Vec<ValueId>,
    },
}

/// Whether the kernel reads or writes a parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// A tensor parameter of the kernel (a pointer to f32 elements).
#[derive(Clone, Debug, PartialEq)]
pub struct Param {
    pub name: String,
    pub access: Access,
}

/// A complete kernel for one grid point.
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    pub name: String,
    pub params: Vec<Param>,
    /// Type of every value, indexed by `ValueId`.
    pub values: Vec<TileTy>,
    pub body: Vec<Stmt>,
    /// V-tiles per head: the grid is (batch, head, V-tile), and a kernel with more than one
    /// covers `V / vtiles` columns of the state per grid point (`IdxVar::VTile` says which).
    pub vtiles: usize,
    /// The iterations of the kernel's loop are independent (it carries nothing): the chunk is
    /// a grid axis, and an executor may run the iterations in any order, each on any worker
    /// or CTA (a chunk-parallel phase). Otherwise the loop runs in order on one grid point.
    pub chunk_parallel: bool,
}

impl Kernel {
    pub fn ty(&self, v: ValueId) -> TileTy {
        self.values[v.0 as usize]
    }
}

impl fmt::Display for ValueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sixteen_bit_conversions_are_exact_and_round_to_even() {
        // Every f16 bit pattern widens to the value IEEE defines, and narrows back.
        for h in 0..=u16::MAX {
            let x = ElemType::F16.widen16(h);
            let (exp, man) = ((h >> 10) & 31, (h & 1023) as f64);
            let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
            let want = match exp {
                0 => sign * man * 2f64.powi(-24),
                31 if man == 0.0 => sign * f64::INFINITY,
                31 => f64::NAN,
                e => sign * (1.0 + man / 1024.0) * 2f64.powi(e as i32 - 15),
            };
            if want.is_nan() {
                assert!(x.is_nan(), "{h:#06x}");
                continue;
            }
            assert_eq!(x as f64, want, "{h:#06x}");
            assert_eq!(ElemType::F16.narrow16(x), h, "{h:#06x} round trip");
        }
        assert_eq!(ElemType::Bf16.widen16(0x3F80), 1.0);
        assert_eq!(ElemType::Bf16.widen16(0xFF80), f32::NEG_INFINITY);
        // Ties go to even; halfway above 1 + 2^-7 in bf16.
        assert_eq!(ElemType::Bf16.narrow16(1.0 + 2f32.powi(-8)), 0x3F80);
        assert_eq!(ElemType::Bf16.narrow16(1.0 + 3.0 * 2f32.powi(-8)), 0x3F82);
        assert_eq!(ElemType::F16.narrow16(1.0 + 2f32.powi(-11)), 0x3C00);
        assert_eq!(ElemType::F16.narrow16(65520.0), 0x7C00);
        assert_eq!(ElemType::F16.narrow16(2f32.powi(-25)), 0, "halfway to the smallest subnormal: even");
        assert!(ElemType::Bf16.widen16(ElemType::Bf16.narrow16(f32::NAN)).is_nan());
    }
}
