//! Tensor-core `Dot`: `mma.sync` on warp tiles of 16 x 16 outputs (two m16n8 products side
//! by side), accumulated in f32 registers across the whole k range.
//!
//! - **bf16 / f16** (`mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32`): the
//!   operands are converted (`cvt.rn.{bf16,f16}x2.f32`, round to nearest even) into staging
//!   buffers in shared memory, `op(a)` as an m x k row-major array and `op(b)` as an n x k
//!   row-major array (so B is "col" as the instruction wants: any transpose of the IR's
//!   operands is absorbed by the staging layout, and `ldmatrix` never needs `.trans`). Each
//!   staged row is padded by 8 elements (16 bytes): with a row of `kb + 8` halves, kb a
//!   multiple of 16, the stride is an odd multiple of 16 bytes, so the eight row addresses of
//!   one 8 x 8 `ldmatrix` matrix fall in eight different 16-byte bank groups (no conflicts).
//!   Fragments are loaded with `ldmatrix.sync.aligned.m8n8.x4.shared.b16`. When the staged
//!   operands do not fit [`PtxSchedule::staging_bytes`](super::PtxSchedule), k is staged in
//!   slices, the accumulators staying in registers.
//! - **tf32** (`mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32`): no staging: each thread
//!   loads its fragment elements straight from the operand tiles (any strides) and rounds
//!   them with `cvt.rna.tf32.f32`.
//!
//! m and n are padded to 16, k to the instruction's k: padded operand elements are zeros
//! (staged as 0, or a predicated-off load), padded outputs are never stored. Warp w owns the
//! warp tiles w, w + W, w + 2W, ... (row-major over the 16 x 16 tiles); a pass covers at most
//! [`MAX_TILES_PER_WARP`] tiles per warp (8 f32 accumulators per tile and thread), and a dot
//! with more tiles runs several passes.
//!
//! Every index formula below names the PTX ISA table it implements (PTX ISA 8.x, section
//! 9.7.14.5, "Matrix Fragments for mma.m16n8k16 with floating point type" and "... for
//! mma.m16n8k8"; section 9.7.14.5.15 / "ldmatrix" for the warp-wide matrix load). In those
//! tables `groupID = laneid >> 2` and `threadID_in_group = laneid % 4`.

use super::emit::{Em, F, P, R, RD};
use super::DotPrecision;
use crate::ir::*;

/// Warp tiles one warp accumulates at once (8 f32 registers each): 4 keeps every library
/// kernel under the 128 registers ptxas gives a 256-thread CTA without spilling.
pub const MAX_TILES_PER_WARP: usize = 4;

/// Padding of a staged row, in 16-bit elements (16 bytes: keeps rows 16-byte aligned for
/// `ldmatrix` and makes the row stride an odd multiple of 16 bytes).
pub const STAGE_PAD: usize = 8;

fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m) * m
}

// ---- the ISA's fragment layouts (pure functions, unit-tested below) ----

/// `(groupID, threadID_in_group)` of a lane.
pub fn group_of(lane: usize) -> (usize, usize) {
    (lane >> 2, lane % 4)
}

/// m16n8k16, multiplicand A, .f16/.bf16 (ISA Figure "MMA .m16n8k16 fragment layout for matrix
/// A with .f16/.bf16 type"): element `a_i` (i in 0..8; register i / 2, half i % 2) of `lane`
/// is A[row][col] with row = groupID for i < 2 or 4 <= i < 6, else groupID + 8; col =
/// threadID_in_group * 2 + (i & 1), plus 8 for i >= 4.
pub fn a16_elem(lane: usize, i: usize) -> (usize, usize) {
    let (g, t) = group_of(lane);
    let row = if i < 2 || (4..6).contains(&i) { g } else { g + 8 };
    let col = t * 2 + (i & 1) + if i >= 4 { 8 } else { 0 };
    (row, col)
}

/// m16n8k16, multiplicand B, .f16/.bf16 (ISA Figure "MMA .m16n8k16 fragment layout for matrix
/// B with .f16/.bf16 type"): element `b_i` (i in 0..4; register i / 2, half i % 2) is
/// B[row][col] (row = k) with row = threadID_in_group * 2 + (i & 1), plus 8 for i >= 2;
/// col = groupID.
pub fn b16_elem(lane: usize, i: usize) -> (usize, usize) {
    let (g, t) = group_of(lane);
    (t * 2 + (i & 1) + if i >= 2 { 8 } else { 0 }, g)
}

/// m16n8k8, multiplicand A, .tf32 (ISA Figure "MMA .m16n8k8 fragment layout for matrix A with
/// .tf32 type"): `a_i` (i in 0..4, one register each) is A[row][col] with row = groupID for
/// a0 and a2, groupID + 8 for a1 and a3; col = threadID_in_group for a0 and a1, plus 4 for
/// a2 and a3.
pub fn a_tf32_elem(lane: usize, i: usize) -> (usize, usize) {
    let (g, t) = group_of(lane);
    (g + if i % 2 == 1 { 8 } else { 0 }, t + if i >= 2 { 4 } else { 0 })
}

/// m16n8k8, multiplicand B, .tf32 (ISA Figure "MMA .m16n8k8 fragment layout for matrix B with
/// .tf32 type"): `b_i` (i in 0..2) is B[row][col] with row = threadID_in_group for b0,
/// threadID_in_group + 4 for b1; col = groupID.
pub fn b_tf32_elem(lane: usize, i: usize) -> (usize, usize) {
    let (g, t) = group_of(lane);
    (t + 4 * i, g)
}

/// m16n8k16 and m16n8k8, accumulators C/D, .f32 (ISA Figure "MMA .m16n8k16 fragment layout
/// for accumulator matrix C/D with .f32 type", the same for m16n8k8): `c_i` (i in 0..4) is
/// C[row][col] with row = groupID for i < 2, groupID + 8 otherwise; col =
/// threadID_in_group * 2 + (i & 1).
pub fn c_elem(lane: usize, i: usize) -> (usize, usize) {
    let (g, t) = group_of(lane);
    (g + if i >= 2 { 8 } else { 0 }, t * 2 + (i & 1))
}

/// `ldmatrix .m8n8 .x4`, address operand (ISA "ldmatrix": for .x4, threads 0-7, 8-15, 16-23
/// and 24-31 give the addresses of the 8 rows of matrices 0, 1, 2 and 3): the (matrix, row)
/// whose 16-byte row address `lane` provides.
pub fn ldmatrix_row_of(lane: usize) -> (usize, usize) {
    (lane / 8, lane % 8)
}

/// `ldmatrix .m8n8` (no `.trans`), destination (ISA "ldmatrix" fragment figure: each thread
/// receives two consecutive 16-bit elements of one row per matrix): register `reg` of `lane`
/// holds, as its halves h = 0 (low) and 1 (high), elements (row lane / 4, col 2 * (lane % 4) + h)
/// of matrix `reg`.
pub fn ldmatrix_elem(lane: usize, h: usize) -> (usize, usize) {
    (lane / 4, 2 * (lane % 4) + h)
}

/// The staged-A position (row of op(a), k offset within the 16-wide k step) of the row
/// address `lane` gives to `ldmatrix.x4` so that registers 0..4 become a16 registers 0..4:
/// matrix q covers rows 8 * (q % 2) .. + 8 and k 8 * (q / 2) .. + 8 of the 16 x 16 A tile
/// (a16 registers: 0 = rows 0-7 k 0-7, 1 = rows 8-15 k 0-7, 2 = rows 0-7 k 8-15, 3 = rows
/// 8-15 k 8-15, from [`a16_elem`]).
pub fn stage_a_row(lane: usize) -> (usize, usize) {
    let (q, r) = ldmatrix_row_of(lane);
    (8 * (q % 2) + r, 8 * (q / 2))
}

/// The staged-B position (n within the 16-wide warp tile, k offset) of the row address
/// `lane` gives to `ldmatrix.x4`, so that registers 0, 1 are the b16 registers of the first
/// n8 product (n 0-7; k 0-7 then k 8-15, from [`b16_elem`]) and registers 2, 3 those of the
/// second (n 8-15): matrix q covers n 8 * (q / 2) .. + 8 and k 8 * (q % 2) .. + 8 of the n x k
/// staged array.
pub fn stage_b_row(lane: usize) -> (usize, usize) {
    let (q, r) = ldmatrix_row_of(lane);
    (8 * (q / 2) + r, 8 * (q % 2))
}

/// Bytes of the two staging buffers of an `m x k` by `k x n` dot staged in k-slices of `kb`
/// (after padding m and n to 16).
pub fn stage_bytes(m: usize, n: usize, kb: usize) -> usize {
    (round_up(m, 16) + round_up(n, 16)) * (kb + STAGE_PAD) * 2
}

/// The k-slice (a multiple of 16) a bf16/f16 dot is staged in: the whole padded k when it
/// fits `budget` bytes, else the largest slice that does; None if not even 16 fits.
pub fn stage_slice(m: usize, n: usize, k: usize, budget: usize) -> Option<usize> {
    let kp = round_up(k, 16);
    (1..=kp / 16).rev().map(|s| 16 * s).find(|&kb| stage_bytes(m, n, kb) <= budget)
}

/// How one `Dot` is lowered under a precision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DotPlan {
    /// The f32 fma loop.
    Fma,
    /// tf32 tensor cores.
    Tf32,
    /// 16-bit tensor cores, staged in k-slices of `kb`.
    Half { kb: usize },
}

/// The plan of a dot with output m x n and inner dimension k.
pub fn plan_dot(prec: DotPrecision, m: usize, n: usize, k: usize, min_dim: usize, budget: usize) -> DotPlan {
    if !prec.tensor_cores() || m.min(n).min(k) < min_dim.max(1) {
        return DotPlan::Fma;
    }
    match prec {
        DotPrecision::F32Fma => DotPlan::Fma,
        DotPrecision::Tf32 => DotPlan::Tf32,
        DotPrecision::Bf16 | DotPrecision::F16 => match stage_slice(m, n, k, budget) {
            Some(kb) => DotPlan::Half { kb },
            None => DotPlan::Fma,
        },
    }
}

/// The (m, n, k) of a dot op in `kernel`.
pub fn dot_dims(kernel: &Kernel, a: ValueId, b: ValueId, ta: bool, tb: bool) -> (usize, usize, usize) {
    let (xa, xb) = (kernel.ty(a), kernel.ty(b));
    let (m, k) = if ta { (xa.cols, xa.rows) } else { (xa.rows, xa.cols) };
    let n = if tb { xb.rows } else { xb.cols };
    (m, n, k)
}

/// Shared staging bytes the kernel's 16-bit tensor-core dots need (the largest of them).
pub fn staging_need(kernel: &Kernel, prec: DotPrecision, min_dim: usize, budget: usize) -> usize {
    fn walk(k: &Kernel, stmts: &[Stmt], f: &mut dyn FnMut(usize, usize, usize)) {
        for s in stmts {
            match s {
                Stmt::Let { op: Op::Dot { a, b, ta, tb, .. }, .. } => {
                    let (m, n, kk) = dot_dims(k, *a, *b, *ta, *tb);
                    f(m, n, kk);
                }
                Stmt::Loop { body, .. } => walk(k, body, f),
                _ => {}
            }
        }
    }
    let mut need = 0;
    walk(kernel, &kernel.body, &mut |m, n, k| {
        if let DotPlan::Half { kb } = plan_dot(prec, m, n, k, min_dim, budget) {
            need = need.max(stage_bytes(m, n, kb));
        }
    });
    need
}

/// True when some dot of `kernel` runs on tensor cores under `sched`.
pub fn uses_tensor_cores(kernel: &Kernel, sched: &super::PtxSchedule) -> bool {
    fn walk(k: &Kernel, stmts: &[Stmt], s: &super::PtxSchedule) -> bool {
        stmts.iter().any(|st| match st {
            Stmt::Let { op: Op::Dot { a, b, ta, tb, .. }, .. } => {
                let (m, n, kk) = dot_dims(k, *a, *b, *ta, *tb);
                plan_dot(s.dot, m, n, kk, s.min_mma_dim, s.staging_bytes) != DotPlan::Fma
            }
            Stmt::Loop { body, .. } => walk(k, body, s),
            _ => false,
        })
    }
    walk(kernel, &kernel.body, sched)
}

/// Operand access of a dot: element (i, p) of op(a) is at `off + (i * si + p * sp) * 4`.
#[derive(Clone, Copy)]
struct Operand {
    off: i64,
    /// Stride (elements) along the operand's output dimension (m for A, n for B).
    so: i64,
    /// Stride along k.
    sk: i64,
    /// In a double-buffered region (see `layout::Storage::phase`).
    phase: bool,
}

/// Per-lane index registers shared by every tensor-core dot of a kernel.
#[derive(Clone, Debug)]
pub(super) struct LaneRegs {
    pub warp: String,
    /// groupID and threadID_in_group.
    pub g: String,
    pub t: String,
    /// Staged-A row and k offset this lane addresses for ldmatrix ([`stage_a_row`]).
    pub ar: String,
    pub ak: String,
    /// Staged-B row and k offset ([`stage_b_row`]).
    pub br: String,
    pub bk: String,
}

/// One warp tile of the current pass: its registers and predicates.
struct WarpTile {
    /// Warp-uniform: this warp has a tile in this slot.
    active: String,
    /// Tile row and column (u32, in units of 16).
    tm: String,
    tn: String,
    /// Accumulators: [half][i] (half 0 = n 0-7, 1 = n 8-15 of the tile).
    acc: [[String; 4]; 2],
}

impl Em<'_> {
    /// Computes the per-lane registers once (at the first tensor-core dot).
    pub(super) fn lane_regs(&mut self) -> LaneRegs {
        if let Some(l) = &self.lanes {
            return l.clone();
        }
        let tid = self.tid.clone();
        let [lane, warp, g, t, q, r, ar, ak, br, bk] = std::array::from_fn(|_| self.reg(R));
        self.comment("lane, warp, mma groupID / threadID_in_group, ldmatrix row addresses (ISA tables, ptx/mma.rs)");
        self.ins(format!("and.b32 {lane}, {tid}, 31"));
        self.ins(format!("shr.u32 {warp}, {tid}, 5"));
        self.ins(format!("shr.u32 {g}, {lane}, 2"));
        self.ins(format!("and.b32 {t}, {lane}, 3"));
        // ldmatrix_row_of: matrix q = lane / 8, row r = lane % 8.
        self.ins(format!("shr.u32 {q}, {lane}, 3"));
        self.ins(format!("and.b32 {r}, {lane}, 7"));
        // stage_a_row: (8 * (q % 2) + r, 8 * (q / 2)); stage_b_row: (8 * (q / 2) + r, 8 * (q % 2)).
        let (q2, qh) = (self.reg(R), self.reg(R));
        self.ins(format!("and.b32 {q2}, {q}, 1"));
        self.ins(format!("shr.u32 {qh}, {q}, 1"));
        self.ins(format!("mad.lo.u32 {ar}, {q2}, 8, {r}"));
        self.ins(format!("shl.b32 {ak}, {qh}, 3"));
        self.ins(format!("mad.lo.u32 {br}, {qh}, 8, {r}"));
        self.ins(format!("shl.b32 {bk}, {q2}, 3"));
        let l = LaneRegs { warp, g, t, ar, ak, br, bk };
        self.lanes = Some(l.clone());
        l
    }

    /// Lowers `op(a) @ op(b) (+ acc)` on tensor cores; `plan` is not [`DotPlan::Fma`].
    #[allow(clippy::too_many_arguments)]
    pub(super) fn mma_dot(
        &mut self,
        id: ValueId,
        a: ValueId,
        b: ValueId,
        ta: bool,
        tb: bool,
        acc: Option<ValueId>,
        plan: DotPlan,
    ) {
        let (m, n, k) = dot_dims(self.k, a, b, ta, tb);
        let (sa, sb) = (self.storage(a), self.storage(b));
        let opa = if ta {
            Operand { off: sa.off, so: sa.cs, sk: sa.rs, phase: sa.phase }
        } else {
            Operand { off: sa.off, so: sa.rs, sk: sa.cs, phase: sa.phase }
        };
        let opb = if tb {
            Operand { off: sb.off, so: sb.rs, sk: sb.cs, phase: sb.phase }
        } else {
            Operand { off: sb.off, so: sb.cs, sk: sb.rs, phase: sb.phase }
        };
        let (mp, np) = (round_up(m, 16), round_up(n, 16));
        let (tiles_n, n_tiles) = (np / 16, (mp / 16) * (np / 16));
        let warps = self.sched.warps as usize;
        let per_pass = warps * MAX_TILES_PER_WARP;
        let lanes = self.lane_regs();
        self.comment(format!("tensor-core dot {m}x{n}x{k} ({plan:?}), {n_tiles} warp tiles of 16x16"));
        let mut p0 = 0;
        while p0 < n_tiles {
            let p1 = (p0 + per_pass).min(n_tiles);
            let slots = (p1 - p0).div_ceil(warps);
            let tiles: Vec<WarpTile> =
                (0..slots).map(|s| self.warp_tile(&lanes, p0 + s * warps, p1, tiles_n)).collect();
            for wt in &tiles {
                self.init_acc(wt, &lanes, acc, m, n);
            }
            match plan {
                DotPlan::Half { kb } => self.half_k_loop(&tiles, &lanes, opa, opb, (m, n, k), kb),
                DotPlan::Tf32 => self.tf32_k_loop(&tiles, &lanes, opa, opb, (m, n, k)),
                DotPlan::Fma => unreachable!("fma dots are not lowered here"),
            }
            for wt in &tiles {
                self.store_acc(wt, &lanes, id, m, n);
            }
            p0 = p1;
            if p0 < n_tiles && matches!(plan, DotPlan::Half { .. }) {
                // The next pass restages the operands.
                self.barrier();
            }
        }
        self.barrier();
    }

    /// Registers of the warp tile `first + warp` of a pass ending at `end`.
    fn warp_tile(&mut self, l: &LaneRegs, first: usize, end: usize, tiles_n: usize) -> WarpTile {
        let (t, tm, tn, active) = (self.reg(R), self.reg(R), self.reg(R), self.reg(P));
        self.ins(format!("add.u32 {t}, {}, {first}", l.warp));
        self.ins(format!("setp.lt.u32 {active}, {t}, {end}"));
        self.ins(format!("div.u32 {tm}, {t}, {tiles_n}"));
        self.ins(format!("rem.u32 {tn}, {t}, {tiles_n}"));
        let acc = std::array::from_fn(|_| std::array::from_fn(|_| self.reg(F)));
        WarpTile { active, tm, tn, acc }
    }

    /// Output row and column registers of accumulator element (half, i) of a warp tile
    /// ([`c_elem`]: row 16 tm + groupID (+8 for i >= 2), col 16 tn + 8 half + 2 threadID_in_group + (i & 1)).
    fn acc_pos(&mut self, wt: &WarpTile, l: &LaneRegs, half: usize, i: usize) -> (String, String) {
        let (row, col) = (self.reg(R), self.reg(R));
        self.ins(format!("mad.lo.u32 {row}, {}, 16, {}", wt.tm, l.g));
        if i >= 2 {
            self.ins(format!("add.u32 {row}, {row}, 8"));
        }
        self.ins(format!("mad.lo.u32 {col}, {}, 16, {}", wt.tn, l.t));
        self.ins(format!("add.u32 {col}, {col}, {}", l.t));
        let c0 = 8 * half + (i & 1);
        if c0 > 0 {
            self.ins(format!("add.u32 {col}, {col}, {c0}"));
        }
        (row, col)
    }

    /// Predicate `row < m && col < n` (None when the padding needs no check).
    fn in_bounds(&mut self, row: &str, col: &str, m: usize, n: usize) -> Option<String> {
        let mut preds = vec![];
        if !m.is_multiple_of(16) {
            let p = self.reg(P);
            self.ins(format!("setp.lt.u32 {p}, {row}, {m}"));
            preds.push(p);
        }
        if !n.is_multiple_of(16) {
            let p = self.reg(P);
            self.ins(format!("setp.lt.u32 {p}, {col}, {n}"));
            preds.push(p);
        }
        self.and_preds(preds)
    }

    fn and_preds(&mut self, mut preds: Vec<String>) -> Option<String> {
        let first = preds.pop()?;
        for p in preds {
            self.ins(format!("and.pred {first}, {first}, {p}"));
        }
        Some(first)
    }

    /// Accumulators start at the `acc` operand (or 0).
    fn init_acc(&mut self, wt: &WarpTile, l: &LaneRegs, acc: Option<ValueId>, m: usize, n: usize) {
        for half in 0..2 {
            for i in 0..4 {
                self.ins(format!("mov.f32 {}, 0f00000000", wt.acc[half][i]));
            }
        }
        let Some(c) = acc else { return };
        let space = self.space;
        self.each_acc(wt, l, c, m, n, |addr, reg| format!("ld.{space}.f32 {reg}, [{addr}]"));
    }

    /// Writes the accumulators of a warp tile to the output tile.
    fn store_acc(&mut self, wt: &WarpTile, l: &LaneRegs, id: ValueId, m: usize, n: usize) {
        let space = self.space;
        self.each_acc(wt, l, id, m, n, |addr, reg| format!("st.{space}.f32 [{addr}], {reg}"));
    }

    /// Emits `access(address, register)` for each accumulator register of an active warp
    /// tile and its element of tile `id` (m x n), skipping elements of the padding.
    fn each_acc(
        &mut self,
        wt: &WarpTile,
        l: &LaneRegs,
        id: ValueId,
        m: usize,
        n: usize,
        access: impl Fn(&str, &str) -> String,
    ) {
        let skip = self.label();
        self.ins(format!("@!{} bra.uni {skip}", wt.active));
        let st = self.storage(id);
        for half in 0..2 {
            for i in 0..4 {
                let (row, col) = self.acc_pos(wt, l, half, i);
                let p = self.in_bounds(&row, &col, m, n);
                let addr = self.taddr(st, DType::F32, Some(&row), Some(&col));
                let guard = p.map(|p| format!("@{p} ")).unwrap_or_default();
                self.ins(format!("{guard}{}", access(&addr, &wt.acc[half][i])));
            }
        }
        self.place(&skip);
    }

    /// Stages op(x) rows `0..rows_p` (zero past `rows`), k `k0 .. k0 + kb` (zero past `k`) as
    /// 16-bit pairs into the staging buffer at byte `at`, row stride `stride` elements (the
    /// slice's column c - k0 goes to column c - k0 of the staged row).
    #[allow(clippy::too_many_arguments)]
    fn stage(
        &mut self,
        x: Operand,
        (rows, rows_p): (usize, usize),
        (k, k0, kb): (usize, usize, usize),
        stride: usize,
        at: usize,
        cvt: &str,
    ) {
        let pairs = kb / 2;
        let tail = k0 + kb > k;
        // Every copy's two loads before any copy converts and stores (the loads in flight
        // together: `Em::eloop_unrolled`).
        let (l, es) = self.eloop_unrolled(rows_p * pairs);
        let mut loaded = vec![];
        for e in &es {
            let (i, pp) = self.split(e, pairs);
            // Column c = k0 + 2 pp of op(x) row i, and c + 1.
            let (cs, c) = (self.reg(R), self.reg(R));
            self.ins(format!("shl.b32 {cs}, {pp}, 1"));
            self.ins(format!("add.u32 {c}, {cs}, {k0}"));
            let row_ok = if rows < rows_p {
                let p = self.reg(P);
                self.ins(format!("setp.lt.u32 {p}, {i}, {rows}"));
                Some(p)
            } else {
                None
            };
            let mut vals = vec![];
            for h in 0..2 {
                let mut preds: Vec<String> = row_ok.iter().cloned().collect();
                if tail {
                    let (ch, p) = (self.reg(R), self.reg(P));
                    self.ins(format!("add.u32 {ch}, {c}, {h}"));
                    self.ins(format!("setp.lt.u32 {p}, {ch}, {k}"));
                    preds.push(p);
                }
                let guard = self.and_preds(preds);
                let st = crate::midend::layout::Storage {
                    off: x.off + h as i64 * x.sk * 4,
                    rs: x.so,
                    cs: x.sk,
                    phase: x.phase,
                };
                let addr = self.taddr(st, DType::F32, Some(&i), Some(&c));
                let v = self.reg(F);
                match guard {
                    Some(p) => {
                        self.ins(format!("mov.f32 {v}, 0f00000000"));
                        self.ins(format!("@{p} ld.{}.f32 {v}, [{addr}]", self.space));
                    }
                    None => self.ins(format!("ld.{}.f32 {v}, [{addr}]", self.space)),
                }
                vals.push(v);
            }
            loaded.push((i, cs, vals));
        }
        for (i, cs, vals) in loaded {
            // cvt.rn.{bf16,f16}x2.f32 d, a, b puts a in the upper half and b in the lower half
            // (ISA "cvt"); the lower half is the lower address, element c.
            let d = self.reg(R);
            self.ins(format!("cvt.rn.{cvt}x2.f32 {d}, {}, {}", vals[1], vals[0]));
            let off = self.reg(R);
            self.ins(format!("mad.lo.u32 {off}, {i}, {stride}, {cs}"));
            let addr = self.reg(RD);
            self.ins(format!("mul.wide.u32 {addr}, {off}, 2"));
            self.ins(format!("add.s64 {addr}, {addr}, {}", self.stage_base()));
            let imm = if at > 0 { format!("+{at}") } else { String::new() };
            self.ins(format!("st.shared.b32 [{addr}{imm}], {d}"));
        }
        self.eloop_end_no_barrier(l);
    }

    /// The k loop of a 16-bit dot: per k-slice, stage both operands, then every warp runs
    /// `ldmatrix` + two `mma` per 16-wide k step and tile.
    fn half_k_loop(
        &mut self,
        tiles: &[WarpTile],
        l: &LaneRegs,
        opa: Operand,
        opb: Operand,
        (m, n, k): (usize, usize, usize),
        kb: usize,
    ) {
        let (mp, np, kp) = (round_up(m, 16), round_up(n, 16), round_up(k, 16));
        let ty = if self.sched.dot == DotPrecision::F16 { "f16" } else { "bf16" };
        let stride = kb + STAGE_PAD;
        let b_at = mp * stride * 2;
        self.stage_used = self.stage_used.max(stage_bytes(m, n, kb));
        // Per tile: byte offsets of this lane's ldmatrix rows in the A and B stages.
        let mut addrs = vec![];
        for wt in tiles {
            let (ra, rb) = (self.reg(R), self.reg(R));
            self.ins(format!("mad.lo.u32 {ra}, {}, 16, {}", wt.tm, l.ar));
            self.ins(format!("mad.lo.u32 {ra}, {ra}, {stride}, {}", l.ak));
            self.ins(format!("mad.lo.u32 {rb}, {}, 16, {}", wt.tn, l.br));
            self.ins(format!("mad.lo.u32 {rb}, {rb}, {stride}, {}", l.bk));
            let (pa, pb) = (self.reg(RD), self.reg(RD));
            let base = self.stage_base();
            self.ins(format!("mul.wide.u32 {pa}, {ra}, 2"));
            self.ins(format!("add.s64 {pa}, {pa}, {base}"));
            self.ins(format!("mul.wide.u32 {pb}, {rb}, 2"));
            self.ins(format!("add.s64 {pb}, {pb}, {base}"));
            addrs.push((pa, pb));
        }
        let mut k0 = 0;
        while k0 < kp {
            let kbl = kb.min(kp - k0);
            self.comment(format!("stage k {k0}..{} as {ty}", k0 + kbl));
            self.stage(opa, (m, mp), (k, k0, kbl), stride, 0, ty);
            self.stage(opb, (n, np), (k, k0, kbl), stride, b_at, ty);
            self.barrier();
            for (wt, (pa, pb)) in tiles.iter().zip(&addrs) {
                let skip = self.label();
                self.ins(format!("@!{} bra.uni {skip}", wt.active));
                for kk in (0..kbl).step_by(16) {
                    let fa: [String; 4] = std::array::from_fn(|_| self.reg(R));
                    let fb: [String; 4] = std::array::from_fn(|_| self.reg(R));
                    let (ia, ib) = (kk * 2, b_at + kk * 2);
                    self.ins(format!("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{{}}}, [{pa}+{ia}]", fa.join(", ")));
                    self.ins(format!("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{{}}}, [{pb}+{ib}]", fb.join(", ")));
                    for half in 0..2 {
                        let d = wt.acc[half].join(", ");
                        self.ins(format!(
                            "mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32 {{{d}}}, {{{}}}, {{{}, {}}}, {{{d}}}",
                            fa.join(", "),
                            fb[2 * half],
                            fb[2 * half + 1]
                        ));
                    }
                }
                self.place(&skip);
            }
            k0 += kbl;
            if k0 < kp {
                // The next slice overwrites the stage.
                self.barrier();
            }
        }
    }

    /// The k loop of a tf32 dot: fragments loaded from the operand tiles, 8-wide k steps.
    fn tf32_k_loop(
        &mut self,
        tiles: &[WarpTile],
        l: &LaneRegs,
        opa: Operand,
        opb: Operand,
        (m, n, k): (usize, usize, usize),
    ) {
        let kp = round_up(k, 8);
        for wt in tiles {
            let skip = self.label();
            self.ins(format!("@!{} bra.uni {skip}", wt.active));
            // a_tf32_elem: rows 16 tm + groupID (+8), k = threadID_in_group (+4).
            // b_tf32_elem: k = threadID_in_group (+4), n = 16 tn + 8 half + groupID.
            let (ra, ok_a) = self.frag_rows(&wt.tm, &l.g, &[0, 8], m);
            let (rb, ok_b) = self.frag_rows(&wt.tn, &l.g, &[0, 8], n);
            let base_a: Vec<String> = ra.iter().map(|r| self.frag_ptr(opa, r, &l.t)).collect();
            let base_b: Vec<String> = rb.iter().map(|r| self.frag_ptr(opb, r, &l.t)).collect();
            for kk in (0..kp).step_by(8) {
                // k predicates for the last, partial step.
                let kok: Vec<Option<String>> = (0..2)
                    .map(|h| {
                        (kk + 8 > k).then(|| {
                            let (c, p) = (self.reg(R), self.reg(P));
                            self.ins(format!("add.u32 {c}, {}, {}", l.t, kk + 4 * h));
                            self.ins(format!("setp.lt.u32 {p}, {c}, {k}"));
                            p
                        })
                    })
                    .collect();
                let mut fa = vec![];
                for i in 0..4 {
                    // a_i: row half i % 2, k offset 4 (i / 2).
                    let (rh, kh) = (i % 2, i / 2);
                    let imm = (kk + 4 * kh) as i64 * opa.sk * 4;
                    let guard = self.guard2(ok_a[rh].clone(), kok[kh].clone());
                    fa.push(self.tf32_load(&base_a[rh], imm, guard));
                }
                for half in 0..2 {
                    let mut fb = vec![];
                    // b_i: k offset 4 i.
                    for (i, ki) in kok.iter().enumerate() {
                        let imm = (kk + 4 * i) as i64 * opb.sk * 4;
                        let guard = self.guard2(ok_b[half].clone(), ki.clone());
                        fb.push(self.tf32_load(&base_b[half], imm, guard));
                    }
                    let d = wt.acc[half].join(", ");
                    self.ins(format!(
                        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {{{d}}}, {{{}}}, {{{}}}, {{{d}}}",
                        fa.join(", "),
                        fb.join(", ")
                    ));
                }
            }
            self.place(&skip);
        }
    }

    /// Rows `16 t + g + off` for each offset, with `row < limit` predicates when padding
    /// can put them out of range.
    fn frag_rows(&mut self, t16: &str, g: &str, offs: &[usize], limit: usize) -> (Vec<String>, Vec<Option<String>>) {
        let (mut rows, mut oks) = (vec![], vec![]);
        for &o in offs {
            let r = self.reg(R);
            self.ins(format!("mad.lo.u32 {r}, {t16}, 16, {g}"));
            if o > 0 {
                self.ins(format!("add.u32 {r}, {r}, {o}"));
            }
            let ok = (!limit.is_multiple_of(16)).then(|| {
                let p = self.reg(P);
                self.ins(format!("setp.lt.u32 {p}, {r}, {limit}"));
                p
            });
            rows.push(r);
            oks.push(ok);
        }
        (rows, oks)
    }

    /// Address of op(x)(row, t) (k = t), without the k-step offset.
    fn frag_ptr(&mut self, x: Operand, row: &str, t: &str) -> String {
        let st = crate::midend::layout::Storage { off: x.off, rs: x.so, cs: x.sk, phase: x.phase };
        self.taddr(st, DType::F32, Some(row), Some(t))
    }

    fn guard2(&mut self, a: Option<String>, b: Option<String>) -> Option<String> {
        match (a, b) {
            (Some(a), Some(b)) => {
                let p = self.reg(P);
                self.ins(format!("and.pred {p}, {a}, {b}"));
                Some(p)
            }
            (a, b) => a.or(b),
        }
    }

    /// Loads an f32 at `base + imm` (0 when `guard` is false) and rounds it to tf32.
    fn tf32_load(&mut self, base: &str, imm: i64, guard: Option<String>) -> String {
        let (f, r) = (self.reg(F), self.reg(R));
        let at = if imm != 0 { format!("{base}+{imm}") } else { base.to_string() };
        match guard {
            Some(p) => {
                self.ins(format!("mov.f32 {f}, 0f00000000"));
                self.ins(format!("@{p} ld.{}.f32 {f}, [{at}]", self.space));
            }
            None => self.ins(format!("ld.{}.f32 {f}, [{at}]", self.space)),
        }
        self.ins(format!("cvt.rna.tf32.f32 {r}, {f}"));
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator of test values (exact in bf16: multiples of 1/8).
    fn val(i: usize, j: usize, seed: usize) -> f64 {
        (((i * 31 + j * 17 + seed * 7) % 23) as f64 - 11.0) / 8.0
    }

    #[test]
    fn fragments_cover_each_element_once() {
        let mut a = [[0u32; 16]; 16];
        let mut b = [[0u32; 8]; 16];
        let mut c = [[0u32; 8]; 16];
        let mut at = [[0u32; 8]; 16];
        let mut bt = [[0u32; 8]; 8];
        for lane in 0..32 {
            for i in 0..8 {
                let (r, k) = a16_elem(lane, i);
                a[r][k] += 1;
            }
            for i in 0..4 {
                let (k, n) = b16_elem(lane, i);
                b[k][n] += 1;
                let (r, n) = c_elem(lane, i);
                c[r][n] += 1;
                let (r, k) = a_tf32_elem(lane, i);
                at[r][k] += 1;
            }
            for i in 0..2 {
                let (k, n) = b_tf32_elem(lane, i);
                bt[k][n] += 1;
            }
        }
        assert!(a.iter().flatten().all(|&x| x == 1));
        assert!(b.iter().flatten().all(|&x| x == 1));
        assert!(c.iter().flatten().all(|&x| x == 1));
        assert!(at.iter().flatten().all(|&x| x == 1));
        assert!(bt.iter().flatten().all(|&x| x == 1));
    }

    /// Emulates one warp tile of the 16-bit path exactly as the emitter addresses it: the
    /// staged arrays (A m x k, B n x k, rows padded), the ldmatrix row addresses of
    /// `stage_a_row` / `stage_b_row`, ldmatrix's delivery rule, then mma by the fragment
    /// tables; the result must be the matrix product.
    #[test]
    fn staged_ldmatrix_mma_computes_the_product() {
        let (m, n, k) = (16usize, 16usize, 32usize);
        let stride = k + STAGE_PAD;
        let a = |i: usize, p: usize| val(i, p, 1);
        let b = |p: usize, j: usize| val(p, j, 2);
        let mut sa = vec![f64::NAN; m * stride];
        let mut sb = vec![f64::NAN; n * stride];
        for i in 0..m {
            for p in 0..k {
                sa[i * stride + p] = a(i, p);
            }
        }
        for j in 0..n {
            for p in 0..k {
                sb[j * stride + p] = b(p, j);
            }
        }
        // ldmatrix.x4 at per-lane row addresses: register q of lane l, half h, is element
        // ldmatrix_elem(l, h) of matrix q, whose row r starts where lane 8 q + r points.
        let ldm = |stage: &[f64], addr: &dyn Fn(usize) -> usize| -> Vec<[[f64; 2]; 4]> {
            (0..32)
                .map(|lane| {
                    std::array::from_fn(|q| {
                        std::array::from_fn(|h| {
                            let (r, c) = ldmatrix_elem(lane, h);
                            stage[addr(8 * q + r) + c]
                        })
                    })
                })
                .collect()
        };
        let mut d = [[0.0f64; 16]; 16];
        for kk in (0..k).step_by(16) {
            let fa = ldm(&sa, &|lane| {
                let (r, c) = stage_a_row(lane);
                r * stride + kk + c
            });
            let fb = ldm(&sb, &|lane| {
                let (r, c) = stage_b_row(lane);
                r * stride + kk + c
            });
            for half in 0..2 {
                // mma by the tables: gather A and B from the lanes' fragments.
                let mut ma = [[f64::NAN; 16]; 16];
                let mut mb = [[f64::NAN; 8]; 16];
                for lane in 0..32 {
                    for i in 0..8 {
                        let (r, c) = a16_elem(lane, i);
                        ma[r][c] = fa[lane][i / 2][i % 2];
                    }
                    for i in 0..4 {
                        let (r, c) = b16_elem(lane, i);
                        mb[r][c] = fb[lane][2 * half + i / 2][i % 2];
                    }
                }
                for lane in 0..32 {
                    for i in 0..4 {
                        let (r, c) = c_elem(lane, i);
                        let s: f64 = (0..16).map(|p| ma[r][p] * mb[p][c]).sum();
                        d[r][8 * half + c] += s;
                    }
                }
            }
        }
        for (i, row) in d.iter().enumerate() {
            for (j, &x) in row.iter().enumerate() {
                let want: f64 = (0..k).map(|p| a(i, p) * b(p, j)).sum();
                assert_eq!(x, want, "d[{i}][{j}]");
            }
        }
    }

    #[test]
    fn staging_rows_avoid_bank_conflicts() {
        // The 8 rows of one ldmatrix matrix hit 8 different 16-byte bank groups (of 8 per
        // 128 bytes) for every slice width the planner can pick.
        for kb in (16..=256).step_by(16) {
            let stride_bytes = (kb + STAGE_PAD) * 2;
            let mut groups: Vec<usize> = (0..8).map(|r| (r * stride_bytes / 16) % 8).collect();
            groups.sort_unstable();
            groups.dedup();
            assert_eq!(groups.len(), 8, "kb {kb}");
        }
    }

    #[test]
    fn dot_plans() {
        assert_eq!(plan_dot(DotPrecision::F32Fma, 64, 64, 64, 8, 1 << 20), DotPlan::Fma);
        assert_eq!(plan_dot(DotPrecision::Tf32, 1, 64, 64, 8, 1 << 20), DotPlan::Fma);
        assert_eq!(plan_dot(DotPrecision::Tf32, 16, 8, 8, 8, 0), DotPlan::Tf32);
        assert_eq!(plan_dot(DotPrecision::Bf16, 64, 64, 64, 8, 1 << 20), DotPlan::Half { kb: 64 });
        // 128 + 128 rows of (kb + 8) halves in 16 KiB: kb = 24 -> 16 (a multiple of 16).
        assert_eq!(plan_dot(DotPrecision::Bf16, 128, 128, 128, 8, 16 * 1024), DotPlan::Half { kb: 16 });
        assert_eq!(plan_dot(DotPrecision::Bf16, 128, 128, 128, 8, 100), DotPlan::Fma);
        assert_eq!(stage_bytes(16, 16, 16), 32 * 24 * 2);
    }
}
