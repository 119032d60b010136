//! The tile-IR interpreter: the executable definition of what each op means.
//!
//! Slow and simple on purpose. Backends are tested against it op by op, and chunk plans are
//! debugged with it before any native code exists. f32 tiles hold values rounded to f32 after
//! every op. The sums inside Dot, GatedDot, RowSum and SolveUnitLower are carried in f64 and
//! rounded once (backends accumulate in f32, so those agree to f32 rounding); Cumsum rounds
//! after every add in the tile's dtype, as backends do.

use crate::ir::*;

/// A materialised tile: row-major values.
#[derive(Clone, Debug)]
struct Tile {
    ty: TileTy,
    data: Vec<f64>,
}

impl Tile {
    fn zeros(ty: TileTy) -> Tile {
        Tile { ty, data: vec![0.0; ty.len()] }
    }
    fn at(&self, i: usize, j: usize) -> f64 {
        self.data[i * self.ty.cols + j]
    }
    /// Reads with broadcasting of size-1 dimensions.
    fn bcast(&self, i: usize, j: usize) -> f64 {
        let i = if self.ty.rows == 1 { 0 } else { i };
        let j = if self.ty.cols == 1 { 0 } else { j };
        self.at(i, j)
    }
    fn round(mut self) -> Tile {
        if self.ty.dtype == DType::F32 {
            for x in &mut self.data {
                *x = *x as f32 as f64;
            }
        }
        self
    }
}

/// Element value rounded to the dtype.
fn rnd(x: f64, dtype: DType) -> f64 {
    match dtype {
        DType::F32 => x as f32 as f64,
        DType::F64 => x,
    }
}

pub fn apply_binary(op: BinOp, a: f64, b: f64) -> f64 {
    op.eval(a, b)
}

struct Machine<'k, 'p, 'm> {
    kernel: &'k Kernel,
    tiles: Vec<Option<Tile>>,
    params: &'p mut [&'m mut [f32]],
    batch: i64,
    head: i64,
    vtile: i64,
    seq_len: i64,
    iter: i64,
}

/// An error found while interpreting: an out-of-bounds access or an unset value.
#[derive(Debug, Clone, PartialEq)]
pub struct InterpError(pub String);

impl std::fmt::Display for InterpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Runs `kernel` for grid point (`batch`, `head`) with sequence length `seq_len`.
/// `params[i]` is the memory of parameter i.
pub fn run(kernel: &Kernel, params: &mut [&mut [f32]], batch: i64, head: i64, seq_len: i64) -> Result<(), InterpError> {
    run_tile(kernel, params, batch, head, 0, seq_len)
}

/// [`run`] for grid point (`batch`, `head`, `vtile`) of a kernel split into V-tiles.
pub fn run_tile(
    kernel: &Kernel,
    params: &mut [&mut [f32]],
    batch: i64,
    head: i64,
    vtile: i64,
    seq_len: i64,
) -> Result<(), InterpError> {
    let mut m =
        Machine { kernel, tiles: vec![None; kernel.values.len()], params, batch, head, vtile, seq_len, iter: 0 };
    m.block(&kernel.body)
}

impl Machine<'_, '_, '_> {
    fn idx(&self, i: &Idx) -> i64 {
        let (b, h, t, it, vt) = (self.batch, self.head, self.seq_len, self.iter, self.vtile);
        i.eval(&|v| match v {
            IdxVar::Batch => b,
            IdxVar::Head => h,
            IdxVar::VTile => vt,
            IdxVar::SeqLen => t,
            IdxVar::Iter => it,
        })
    }

    fn get(&self, v: ValueId) -> Result<&Tile, InterpError> {
        self.tiles[v.0 as usize].as_ref().ok_or_else(|| InterpError(format!("{v} read before it is set")))
    }

    fn set(&mut self, v: ValueId, t: Tile) {
        debug_assert_eq!(t.ty, self.kernel.ty(v), "{v}");
        self.tiles[v.0 as usize] = Some(t);
    }

    fn block(&mut self, stmts: &[Stmt]) -> Result<(), InterpError> {
        for s in stmts {
            match s {
                Stmt::Let { id, op } => {
                    let t = self.op(*id, op)?;
                    self.set(*id, t);
                }
                Stmt::Store { value, param, base, row_stride, col_stride, valid_rows } => {
                    let t = self.get(*value)?.clone();
                    let base = self.idx(base);
                    let valid = self.idx(valid_rows);
                    let mem = &mut self.params[*param];
                    for i in 0..t.ty.rows {
                        if (i as i64) >= valid {
                            break;
                        }
                        for j in 0..t.ty.cols {
                            let at = base + i as i64 * row_stride + j as i64 * col_stride;
                            let len = mem.len();
                            let slot = usize::try_from(at).ok().and_then(|a| mem.get_mut(a)).ok_or_else(|| {
                                InterpError(format!("store out of bounds: element {at} of param {param} (len {len})"))
                            })?;
                            *slot = t.at(i, j) as f32;
                        }
                    }
                }
                Stmt::Loop { count, carried, body, yields, results } => {
                    let n = self.idx(count);
                    let mut cur: Vec<Tile> =
                        carried.iter().map(|c| self.get(c.1).cloned()).collect::<Result<_, _>>()?;
                    for it in 0..n.max(0) {
                        self.iter = it;
                        for (c, t) in carried.iter().zip(&cur) {
                            self.set(c.0, t.clone());
                        }
                        self.block(body)?;
                        cur = yields.iter().map(|y| self.get(*y).cloned()).collect::<Result<_, _>>()?;
                    }
                    for (r, t) in results.iter().zip(cur) {
                        self.set(*r, t);
                    }
                }
            }
        }
        Ok(())
    }

    fn op(&mut self, id: ValueId, op: &Op) -> Result<Tile, InterpError> {
        let ty = self.kernel.ty(id);
        let mut out = Tile::zeros(ty);
        match op {
            Op::Load { elem, param, base, row_stride, col_stride, rows, cols, valid_rows } => {
                let base = self.idx(base);
                let valid = self.idx(valid_rows);
                let mem = &self.params[*param];
                for i in 0..*rows {
                    if (i as i64) >= valid {
                        break;
                    }
                    for j in 0..*cols {
                        let at = base + i as i64 * row_stride + j as i64 * col_stride;
                        // 16-bit elements: slot at / 2, low half for even at (see ElemType).
                        let slot = if *elem == ElemType::F32 { at } else { at.div_euclid(2) };
                        let x = usize::try_from(slot).ok().filter(|_| at >= 0).and_then(|a| mem.get(a)).ok_or_else(
                            || {
                                InterpError(format!(
                                    "load out of bounds: element {at} of param {param} (len {} {})",
                                    mem.len() * 4 / elem.size(),
                                    elem.name()
                                ))
                            },
                        )?;
                        out.data[i * cols + j] = match elem {
                            ElemType::F32 => *x as f64,
                            e => e.widen16((x.to_bits() >> (16 * (at & 1))) as u16) as f64,
                        };
                    }
                }
            }
            Op::Const { value, .. } => out.data.fill(rnd(*value, ty.dtype)),
            Op::IdxValue(i) => out.data[0] = rnd(self.idx(i) as f64, ty.dtype),
            Op::Unary { op, x } => {
                let x = self.get(*x)?;
                for (o, v) in out.data.iter_mut().zip(&x.data) {
                    *o = op.eval(*v);
                }
            }
            Op::Binary { op, a, b } => {
                let (a, b) = (self.get(*a)?, self.get(*b)?);
                for i in 0..ty.rows {
                    for j in 0..ty.cols {
                        out.data[i * ty.cols + j] = apply_binary(*op, a.bcast(i, j), b.bcast(i, j));
                    }
                }
            }
            Op::Cast { x, .. } => out.data.clone_from(&self.get(*x)?.data),
            Op::Dot { a, b, ta, tb, acc } => {
                let (a, b) = (self.get(*a)?, self.get(*b)?);
                let k = if *ta { a.ty.rows } else { a.ty.cols };
                for i in 0..ty.rows {
                    for j in 0..ty.cols {
                        let mut s = 0.0;
                        for p in 0..k {
                            let x = if *ta { a.at(p, i) } else { a.at(i, p) };
                            let y = if *tb { b.at(j, p) } else { b.at(p, j) };
                            s += x * y;
                        }
                        out.data[i * ty.cols + j] = s;
                    }
                }
                if let Some(c) = acc {
                    let c = self.get(*c)?;
                    for (o, v) in out.data.iter_mut().zip(&c.data) {
                        *o += v;
                    }
                }
            }
            Op::Cumsum { x, exclusive } => {
                let x = self.get(*x)?;
                for j in 0..ty.cols {
                    let mut s = 0.0;
                    for i in 0..ty.rows {
                        if *exclusive {
                            out.data[i * ty.cols + j] = s;
                            s = rnd(s + x.at(i, j), ty.dtype);
                        } else {
                            s = rnd(s + x.at(i, j), ty.dtype);
                            out.data[i * ty.cols + j] = s;
                        }
                    }
                }
            }
            Op::RowSum { x } => {
                let x = self.get(*x)?;
                for i in 0..ty.rows {
                    out.data[i] = (0..x.ty.cols).map(|j| x.at(i, j)).sum();
                }
            }
            Op::Rows { x, start, len } => {
                let x = self.get(*x)?;
                out.data.copy_from_slice(&x.data[start * x.ty.cols..(start + len) * x.ty.cols]);
            }
            Op::Concat { parts } => {
                let mut at = 0;
                for part in parts {
                    let part = self.get(*part)?;
                    out.data[at..at + part.data.len()].copy_from_slice(&part.data);
                    at += part.data.len();
                }
            }
            Op::Transpose { x } => {
                let x = self.get(*x)?;
                for i in 0..ty.rows {
                    for j in 0..ty.cols {
                        out.data[i * ty.cols + j] = x.at(j, i);
                    }
                }
            }
            Op::Mask { x, mask, fill } => {
                let x = self.get(*x)?;
                let limit = match mask {
                    MaskKind::RowsBefore(i) => self.idx(i),
                    MaskKind::Tril { .. } => 0,
                };
                for i in 0..ty.rows {
                    for j in 0..ty.cols {
                        let keep = match mask {
                            MaskKind::Tril { strict: false } => j <= i,
                            MaskKind::Tril { strict: true } => j < i,
                            MaskKind::RowsBefore(_) => (i as i64) < limit,
                        };
                        out.data[i * ty.cols + j] = if keep { x.at(i, j) } else { rnd(*fill, ty.dtype) };
                    }
                }
            }
            Op::GatedDot { a, ga, b, gb, strict } => {
                let (a, ga, b, gb) = (self.get(*a)?, self.get(*ga)?, self.get(*b)?, self.get(*gb)?);
                let gd = ga.ty.dtype;
                for i in 0..ty.rows {
                    for j in 0..ty.cols {
                        if j > i || (*strict && j == i) {
                            continue;
                        }
                        let mut s = 0.0;
                        for c in 0..a.ty.cols {
                            let e = rnd(rnd(ga.at(i, c) - gb.at(j, c), gd).exp(), DType::F32);
                            s += a.at(i, c) * b.at(j, c) * e;
                        }
                        out.data[i * ty.cols + j] = s;
                    }
                }
            }
            Op::GatedMatMul { m, x, gx, gy, transposed, strict } => {
                let (m, x, gx, gy) = (self.get(*m)?, self.get(*x)?, self.get(*gx)?, self.get(*gy)?);
                let gd = gx.ty.dtype;
                let n = ty.rows;
                for r in 0..n {
                    for c in 0..ty.cols {
                        let mut s = 0.0;
                        for p in 0..n {
                            // (i, j) of the pair: r is i and p is j, or transposed r is j and p is i.
                            let (i, j) = if *transposed { (p, r) } else { (r, p) };
                            if j > i || (*strict && j == i) {
                                continue;
                            }
                            let e = if *transposed { gx.at(i, c) - gy.at(j, c) } else { gy.at(i, c) - gx.at(j, c) };
                            let e = rnd(rnd(e, gd).exp(), DType::F32);
                            s += m.at(i, j) * x.at(p, c) * e;
                        }
                        out.data[r * ty.cols + c] = s;
                    }
                }
            }
            Op::SolveUnitLower { l, b } => {
                let (l, b) = (self.get(*l)?, self.get(*b)?);
                let (n, m) = (ty.rows, ty.cols);
                for i in 0..n {
                    for j in 0..m {
                        let mut s = b.at(i, j);
                        for p in 0..i {
                            s -= l.at(i, p) * out.data[p * m + j];
                        }
                        out.data[i * m + j] = rnd(s, DType::F32);
                    }
                }
            }
        }
        Ok(out.round())
    }
}
