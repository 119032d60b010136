//! Lowering typed rule expressions to tile ops, `rows` tokens at a time.
//!
//! The recurrent kernel lowers every statement with one row (one token) and the state as a
//! K x V tile; the chunk plans lower the canonical form's state-free expressions (the
//! prologue) with one row per token of a chunk. Types map to tiles as: scalar -> `[rows, 1]`,
//! `[K]` -> `[rows, K]`, `[V]` -> `[rows, V]`, K x V -> `[K, V]`; per-head parameters and
//! constants have one row and broadcast.

use crate::builder::Builder;
use crate::ir::*;
use chunkc_dsl::ast::{BinaryOp, Expr, ExprKind, Rule, Ty, UnaryOp};
use std::collections::HashMap;

/// Static problem sizes a kernel is specialised for (T stays dynamic).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shape {
    pub heads: usize,
    pub k: usize,
    pub v: usize,
    /// The value of `scale`.
    pub scale: f64,
}

/// Parameter indices of a kernel built from a rule: the inputs in declaration order, then
/// `h0`, `o`, `hT`, then each extra state's `<name>0` and `<name>T`.
#[derive(Clone, Debug)]
pub struct ParamLayout {
    pub inputs: Vec<usize>,
    pub h0: usize,
    pub o: usize,
    pub ht: usize,
    /// (`<name>0`, `<name>T`) per extra state, in [`Rule::states`] order.
    pub extras: Vec<(usize, usize)>,
}

impl ParamLayout {
    pub fn declare(b: &mut Builder, rule: &Rule) -> ParamLayout {
        let inputs = rule.inputs.iter().map(|i| b.param(i.name.clone(), Access::Read)).collect();
        let h0 = b.param("h0", Access::Read);
        let o = b.param("o", Access::Write);
        let ht = b.param("hT", Access::Write);
        let extras = rule
            .states
            .iter()
            .map(|s| (b.param(s.initial_name(), Access::Read), b.param(s.final_name(), Access::Write)))
            .collect();
        ParamLayout { inputs, h0, o, ht, extras }
    }
}

/// Index of this grid point's extra state of type `ty` in `[B, H, D]`, and the columns it
/// covers: a `[V]` state only the grid point's V-tile.
pub fn extra_state_base(shape: &Shape, ty: Ty, bv: Option<usize>) -> (Idx, usize) {
    let width = if ty == Ty::VecK { shape.k } else { shape.v };
    let base =
        Idx::var(IdxVar::Batch).mul(Idx::c(shape.heads as i64)).add(Idx::var(IdxVar::Head)).mul(Idx::c(width as i64));
    match bv {
        Some(bv) if ty == Ty::VecV => (base.add(v_offset(Some(bv))), bv),
        _ => (base, width),
    }
}

/// Index of the first element of row `t0` of a per-token tensor `[B, T, H, width]` for this
/// grid point, and its row stride.
pub fn token_base(shape: &Shape, t0: Idx, width: usize) -> (Idx, i64) {
    let h = shape.heads as i64;
    let w = width as i64;
    let row = Idx::var(IdxVar::Batch).mul(Idx::var(IdxVar::SeqLen)).add(t0);
    let base = row.mul(Idx::c(h * w)).add(Idx::var(IdxVar::Head).mul(Idx::c(w)));
    (base, h * w)
}

/// Index of this grid point's K x V state in `[B, H, K, V]`.
pub fn state_base(shape: &Shape) -> Idx {
    let kv = (shape.k * shape.v) as i64;
    Idx::var(IdxVar::Batch).mul(Idx::c(shape.heads as i64)).add(Idx::var(IdxVar::Head)).mul(Idx::c(kv))
}

/// Offset of this grid point's first V column: `VTile * BV` when V is split into tiles of BV
/// columns. V-side tensors keep their full-V strides; only the base moves.
pub fn v_offset(bv: Option<usize>) -> Idx {
    match bv {
        Some(bv) => Idx::var(IdxVar::VTile).mul(Idx::c(bv as i64)),
        None => Idx::c(0),
    }
}

/// [`state_base`] moved to this grid point's first V column.
pub fn state_base_tiled(shape: &Shape, bv: Option<usize>) -> Idx {
    match bv {
        Some(_) => state_base(shape).add(v_offset(bv)),
        None => state_base(shape),
    }
}

/// [`token_base`] of a `[V]` tensor (`o`, per-token `[V]` inputs), moved to this grid
/// point's first V column; the row stride stays the full `H * V`.
pub fn v_token_base(shape: &Shape, t0: Idx, bv: Option<usize>) -> (Idx, i64) {
    let (base, stride) = token_base(shape, t0, shape.v);
    match bv {
        Some(_) => (base.add(v_offset(bv)), stride),
        None => (base, stride),
    }
}

/// A lowered value: a tile, or a K x V tile standing for its transpose.
#[derive(Clone, Copy, Debug)]
pub enum LVal {
    Tile(ValueId),
    Transposed(ValueId),
}

/// Why an expression could not be lowered.
#[derive(Clone, Debug, PartialEq)]
pub struct LowerError(pub String);

/// Lowers expressions for one block of `rows` tokens starting at token `t0`.
pub struct Lowerer<'a> {
    pub rule: &'a Rule,
    pub shape: Shape,
    pub layout: &'a ParamLayout,
    pub rows: usize,
    pub t0: Idx,
    /// Rows of the block that hold tokens (`min(rows, T - t0)`).
    pub valid: Idx,
    /// Loaded inputs, by input index.
    loaded: HashMap<usize, ValueId>,
    /// State-free expressions already lowered, by their printed form.
    memo: HashMap<String, ValueId>,
    /// The state as the current statement sees it, and the locals (recurrent kernel only).
    pub state: Option<ValueId>,
    /// The extra states as the current statement sees them (recurrent kernel only).
    pub extras: Vec<Option<ValueId>>,
    /// The state reads an output epilogue refers to (`ExprKind::Read`), by read index.
    pub reads: Vec<Option<ValueId>>,
    pub locals: Vec<Option<LVal>>,
    /// Element type of the per-token input tensors (f32 unless a plan says otherwise).
    pub input_elem: ElemType,
    /// Columns of V per grid point (None: all): `[V]` inputs are loaded BV wide at the
    /// grid point's column offset.
    pub bv: Option<usize>,
}

impl<'a> Lowerer<'a> {
    pub fn new(rule: &'a Rule, shape: Shape, layout: &'a ParamLayout, rows: usize, t0: Idx, valid: Idx) -> Lowerer<'a> {
        Lowerer {
            rule,
            shape,
            layout,
            rows,
            t0,
            valid,
            loaded: HashMap::new(),
            memo: HashMap::new(),
            state: None,
            extras: vec![None; rule.states.len()],
            reads: vec![None; 1 + rule.states.len()],
            locals: vec![None; rule.locals.len()],
            input_elem: ElemType::F32,
            bv: None,
        }
    }

    /// The inputs loaded so far, by input index, in index order.
    pub fn loaded_inputs(&self) -> Vec<(usize, ValueId)> {
        let mut loads: Vec<(usize, ValueId)> = self.loaded.iter().map(|(i, v)| (*i, *v)).collect();
        loads.sort();
        loads
    }

    /// Uses `tile` as input `i`'s rows for this block (loaded by another lowering) instead of
    /// loading them again.
    pub fn reuse_input(&mut self, i: usize, tile: ValueId) {
        self.loaded.insert(i, tile);
    }

    /// Input `i`'s tile for this block, loaded on first use.
    pub fn input(&mut self, b: &mut Builder, i: usize) -> ValueId {
        if let Some(v) = self.loaded.get(&i) {
            return *v;
        }
        let inp = &self.rule.inputs[i];
        let w = inp.width(self.shape.k, self.shape.v);
        let param = self.layout.inputs[i];
        // Per-token inputs are in the input dtype; per-head parameters stay f32 (as in FLA).
        // A `[V]` input of a kernel split into V-tiles: BV columns at the tile's offset.
        let (cols, off) = match self.bv {
            Some(bv) if inp.ty == Ty::VecV => (bv, Some(v_offset(self.bv))),
            _ => (w, None),
        };
        let v = if inp.per_head {
            let mut base = Idx::var(IdxVar::Head).mul(Idx::c(w as i64));
            if let Some(off) = off {
                base = base.add(off);
            }
            b.load(param, base, 0, 1, 1, cols, Idx::c(1))
        } else {
            let (mut base, stride) = token_base(&self.shape, self.t0.clone(), w);
            if let Some(off) = off {
                base = base.add(off);
            }
            b.load_typed(self.input_elem, param, base, stride, 1, self.rows, cols, self.valid.clone())
        };
        self.loaded.insert(i, v);
        v
    }

    /// Lowers a state-free expression to a tile, sharing repeated subexpressions. A vector
    /// expression gets its full width even when its value is a scalar's (the canonical form
    /// broadcasts a scalar into a `[V]` write, say).
    pub fn tile(&mut self, b: &mut Builder, e: &Expr) -> Result<ValueId, LowerError> {
        let cacheable = !e.mentions_state() && !mentions_local(e) && !mentions_read(e);
        let key =
            if cacheable { Some(format!("{:?} {}", e.ty, chunkc_dsl::canon::print_expr(self.rule, e))) } else { None };
        if let Some(k) = &key {
            if let Some(v) = self.memo.get(k) {
                return Ok(*v);
            }
        }
        let v = match self.lower(b, e)? {
            LVal::Tile(v) => v,
            LVal::Transposed(_) => {
                return Err(LowerError("a transposed matrix can only be the left operand of @".into()));
            }
        };
        let width = match e.ty {
            Ty::VecK => self.shape.k,
            Ty::VecV => self.bv.unwrap_or(self.shape.v),
            _ => 1,
        };
        let t = b.ty(v);
        let v = if t.cols == 1 && width > 1 {
            let zeros = b.constant(0.0, TileTy { cols: width, ..t });
            b.add(zeros, v)
        } else {
            v
        };
        if let Some(k) = key {
            self.memo.insert(k, v);
        }
        Ok(v)
    }

    /// Lowers an expression of any type.
    pub fn lower(&mut self, b: &mut Builder, e: &Expr) -> Result<LVal, LowerError> {
        use LVal::*;
        Ok(match &e.kind {
            ExprKind::Num(x) => Tile(b.scalar(*x)),
            ExprKind::Scale => Tile(b.scalar(self.shape.scale)),
            ExprKind::Head => Tile(b.idx_value(Idx::var(IdxVar::Head))),
            ExprKind::Input(i) => Tile(self.input(b, *i)),
            ExprKind::Local(i) => {
                self.locals[*i].ok_or_else(|| LowerError("local read before it is assigned".into()))?
            }
            ExprKind::State => {
                Tile(self.state.ok_or_else(|| LowerError("the state is not available in a chunk prologue".into()))?)
            }
            ExprKind::Extra(i) => Tile(
                self.extras[*i]
                    .ok_or_else(|| LowerError("an extra state is not available in a chunk prologue".into()))?,
            ),
            ExprKind::Read(i) => Tile(
                self.reads
                    .get(*i)
                    .copied()
                    .flatten()
                    .ok_or_else(|| LowerError("a state read outside an output epilogue".into()))?,
            ),
            ExprKind::Unary(op, a) => {
                let mut x = self.tile(b, a)?;
                if matches!(op, UnaryOp::Log | UnaryOp::Sqrt) {
                    x = self.one_past_end(b, x);
                }
                Tile(b.unary(unop(*op), x))
            }
            ExprKind::Binary(op, a, c) => {
                let (mut x, mut y) = (self.tile(b, a)?, self.tile(b, c)?);
                match op {
                    BinaryOp::Div => y = self.one_past_end(b, y),
                    BinaryOp::Pow => x = self.one_past_end(b, x),
                    _ => {}
                }
                let (x, y) = (self.align(b, x, a.ty, c.ty), self.align(b, y, c.ty, a.ty));
                Tile(binary(b, *op, x, y))
            }
            ExprKind::Dot(a, c) => {
                let (x, y) = (self.tile(b, a)?, self.tile(b, c)?);
                let p = b.mul(x, y);
                Tile(b.row_sum(p))
            }
            ExprKind::Sum(a) => {
                let x = self.tile(b, a)?;
                Tile(b.row_sum(x))
            }
            ExprKind::L2Norm(a) => {
                let x = self.tile(b, a)?;
                let sq = b.mul(x, x);
                let n2 = b.row_sum(sq);
                let n2 = self.one_past_end(b, n2);
                let inv = b.unary(UnOp::Sqrt, n2);
                let inv = b.unary(UnOp::Recip, inv);
                Tile(b.mul(x, inv))
            }
            ExprKind::Outer(a, c) => {
                self.need_one_row("outer(...)")?;
                let (x, y) = (self.tile(b, a)?, self.tile(b, c)?);
                Tile(b.dot(x, y, true, false, None))
            }
            ExprKind::Transpose(a) => match self.lower(b, a)? {
                Tile(m) => Transposed(m),
                Transposed(m) => Tile(m),
            },
            ExprKind::MatMul(a, c) => Tile(self.matmul(b, a, c)?),
        })
    }

    /// `x` with the rows past the sequence end set to 1, where a block of several tokens feeds
    /// an op that is singular at 0 (log, sqrt, a divisor, the base of pow, l2norm's norm).
    /// Those rows load as zeros; their results are masked off later, but an infinity or NaN
    /// there would still reach the backward, whose reverse of the later mask is a zero
    /// adjoint, and zero times infinity is NaN (summed into a per-head parameter's gradient).
    /// One-token lowering has no such rows.
    fn one_past_end(&self, b: &mut Builder, x: ValueId) -> ValueId {
        if self.rows == 1 || b.ty(x).rows != self.rows {
            return x;
        }
        b.mask(x, MaskKind::RowsBefore(self.valid.clone()), 1.0)
    }

    fn need_one_row(&self, what: &str) -> Result<(), LowerError> {
        if self.rows == 1 {
            Ok(())
        } else {
            Err(LowerError(format!("{what} in a state-free term of a chunked kernel is not supported")))
        }
    }

    /// `a @ c` for the typed combinations the checker allows.
    fn matmul(&mut self, b: &mut Builder, a: &Expr, c: &Expr) -> Result<ValueId, LowerError> {
        // outer(p, r)^T @ x = r (p . x) and outer(p, r) @ y = p (r . y): no matrix is formed,
        // so these work for any number of rows.
        let outer_parts = |e: &Expr| -> Option<(Expr, Expr, bool)> {
            match &e.kind {
                ExprKind::Outer(p, r) => Some(((**p).clone(), (**r).clone(), false)),
                ExprKind::Transpose(inner) => match &inner.kind {
                    ExprKind::Outer(p, r) => Some(((**p).clone(), (**r).clone(), true)),
                    _ => None,
                },
                _ => None,
            }
        };
        if let Some((p, r, transposed)) = outer_parts(a) {
            let (near, far) = if transposed { (p, r) } else { (r, p) };
            let (x, n, f) = (self.tile(b, c)?, self.tile(b, &near)?, self.tile(b, &far)?);
            let prod = b.mul(n, x);
            let d = b.row_sum(prod);
            return Ok(b.mul(f, d));
        }
        let l = self.lower(b, a)?;
        let r = self.lower(b, c)?;
        Ok(match (a.ty, c.ty, l, r) {
            // S @ y: [1, V] x [K, V]^T -> [1, K]
            (Ty::Mat, Ty::VecV, LVal::Tile(m), LVal::Tile(y)) => {
                self.need_one_row("S @ y")?;
                b.dot(y, m, false, true, None)
            }
            // S^T @ x and x @ S: [1, K] x [K, V] -> [1, V]
            (Ty::MatT, Ty::VecK, LVal::Transposed(m), LVal::Tile(x))
            | (Ty::VecK, Ty::Mat, LVal::Tile(x), LVal::Tile(m)) => {
                self.need_one_row("S^T @ x")?;
                b.dot(x, m, false, false, None)
            }
            // y @ S^T: [1, V] x [K, V]^T -> [1, K]
            (Ty::VecV, Ty::MatT, LVal::Tile(y), LVal::Transposed(m)) => {
                self.need_one_row("y @ S^T")?;
                b.dot(y, m, false, true, None)
            }
            (ta, tc, LVal::Tile(x), LVal::Tile(y)) if ta == tc && matches!(ta, Ty::VecK | Ty::VecV) => {
                let p = b.mul(x, y);
                b.row_sum(p)
            }
            (ta, tc, ..) => return Err(LowerError(format!("cannot lower {ta} @ {tc}"))),
        })
    }

    /// A `[1, K]` vector meeting a K x V matrix scales its rows: make it a `[K, 1]` column.
    fn align(&self, b: &mut Builder, x: ValueId, own: Ty, other: Ty) -> ValueId {
        if own == Ty::VecK && other == Ty::Mat {
            b.transpose(x)
        } else {
            x
        }
    }
}

fn mentions_read(e: &Expr) -> bool {
    matches!(e.kind, ExprKind::Read(_)) || e.children().iter().any(|c| mentions_read(c))
}

fn mentions_local(e: &Expr) -> bool {
    matches!(e.kind, ExprKind::Local(_)) || e.children().iter().any(|c| mentions_local(c))
}

pub fn unop(op: UnaryOp) -> UnOp {
    match op {
        UnaryOp::Neg => UnOp::Neg,
        UnaryOp::Exp => UnOp::Exp,
        UnaryOp::Exp2 => UnOp::Exp2,
        UnaryOp::Log => UnOp::Log,
        UnaryOp::Sigmoid => UnOp::Sigmoid,
        UnaryOp::Softplus => UnOp::Softplus,
        UnaryOp::Silu => UnOp::Silu,
        UnaryOp::Sqrt => UnOp::Sqrt,
        UnaryOp::Abs => UnOp::Abs,
        UnaryOp::Tanh => UnOp::Tanh,
    }
}

/// `x op y` in tile ops: `>` and `>=` are `<` and `<=` with the operands swapped, and `!=`
/// is `1 - (==)`.
pub fn binary(b: &mut Builder, op: BinaryOp, x: ValueId, y: ValueId) -> ValueId {
    let direct = match op {
        BinaryOp::Add => BinOp::Add,
        BinaryOp::Sub => BinOp::Sub,
        BinaryOp::Mul => BinOp::Mul,
        BinaryOp::Div => BinOp::Div,
        BinaryOp::Pow => BinOp::Pow,
        BinaryOp::Min => BinOp::Min,
        BinaryOp::Max => BinOp::Max,
        BinaryOp::Lt => BinOp::Lt,
        BinaryOp::Le => BinOp::Le,
        BinaryOp::Equal => BinOp::Equal,
        BinaryOp::Keep => BinOp::Keep,
        BinaryOp::Gt => return b.binary(BinOp::Lt, y, x),
        BinaryOp::Ge => return b.binary(BinOp::Le, y, x),
        BinaryOp::NotEqual => {
            let eq = b.binary(BinOp::Equal, x, y);
            let one = b.constant(1.0, TileTy { rows: 1, cols: 1, dtype: b.ty(eq).dtype });
            return b.sub(one, eq);
        }
    };
    b.binary(direct, x, y)
}
