//! The interpreter: CTAs one after another; inside a CTA, threads one at a time from barrier
//! to barrier, with the checks of the module documentation.

use super::parse::*;
use super::{GlobalMemory, LaunchLimits, SimError, SimParam, SimReport, SHARED_WINDOW};

const NONE: u32 = u32::MAX;
const MANY: u32 = u32::MAX - 1;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Ready,
    /// Waiting at the barrier instruction with this index (and barrier id).
    AtBarrier(usize, u64),
    Exited,
}

struct Cta<'a> {
    e: &'a Entry,
    ctaid: [u32; 3],
    grid: [u32; 3],
    block: [u32; 3],
    params: &'a [u8],
    shared: Vec<u8>,
    init: Vec<bool>,
    writer: Vec<u32>,
    reader: Vec<u32>,
    /// Per warp: the owner thread of this epoch's `bra.uni` log, and the log.
    uni: Vec<(u32, Vec<(usize, bool)>)>,
    uni_seq: Vec<usize>,
    instructions: u64,
}

impl Cta<'_> {
    fn tid(&self, t: u32) -> [u32; 3] {
        let [x, y, _] = self.block;
        [t % x, (t / x) % y, t / (x * y)]
    }
    fn who(&self, t: u32) -> String {
        let [a, b, c] = self.tid(t);
        let [x, y, z] = self.ctaid;
        format!("thread ({a},{b},{c}) of CTA ({x},{y},{z})")
    }
}

fn f32v(b: u64) -> f32 {
    f32::from_bits(b as u32)
}
fn f64v(b: u64) -> f64 {
    f64::from_bits(b)
}
fn ftz32(x: f32, on: bool) -> f32 {
    if on && x.is_subnormal() {
        0.0f32.copysign(x)
    } else {
        x
    }
}
fn mask(ty: Ty, v: u64) -> u64 {
    match ty.bits() {
        32 => v & 0xFFFF_FFFF,
        8 => v & 1,
        _ => v,
    }
}
/// The integer value of `v` as an i128 (sign- or zero-extended by `ty`).
fn ival(ty: Ty, v: u64) -> i128 {
    match (ty.bits(), ty.is_signed()) {
        (32, true) => v as u32 as i32 as i128,
        (32, false) => v as u32 as i128,
        (_, true) => v as i64 as i128,
        _ => v as i128,
    }
}

#[allow(clippy::too_many_arguments)]
pub fn run(
    _m: &Module,
    e: &Entry,
    grid: [u32; 3],
    block: [u32; 3],
    dynamic_smem: usize,
    params: &[SimParam],
    memory: &mut GlobalMemory,
    limits: LaunchLimits,
) -> Result<SimReport, SimError> {
    if params.len() != e.params.len() {
        return Err(SimError::new(
            e.line,
            format!("entry `{}` takes {} parameters, {} given", e.name, e.params.len(), params.len()),
        ));
    }
    let mut pbytes = vec![0u8; e.param_bytes];
    for (i, (pd, v)) in e.params.iter().zip(params).enumerate() {
        let bits: u64 = match (v, pd.ty.bytes()) {
            (SimParam::U64(x), 8) => *x,
            (SimParam::F64(x), 8) => x.to_bits(),
            (SimParam::U32(x), 4) => *x as u64,
            (SimParam::F32(x), 4) => x.to_bits() as u64,
            _ => {
                return Err(SimError::new(
                    e.line,
                    format!("parameter {i} ({}): value {v:?} does not match .{:?}", pd.name, pd.ty),
                ))
            }
        };
        pbytes[pd.offset..pd.offset + pd.ty.bytes()].copy_from_slice(&bits.to_le_bytes()[..pd.ty.bytes()]);
    }
    let nthreads = block.iter().map(|&b| b as u64).product::<u64>();
    if nthreads == 0 || nthreads > 1024 {
        return Err(SimError::new(0, format!("block {block:?} must have 1..=1024 threads")));
    }
    let nthreads = nthreads as u32;
    // 228 KiB: the most shared memory an sm_90 SM has (sm_80: 164 KiB).
    let shared_bytes = e.dynamic_base.saturating_add(dynamic_smem);
    if shared_bytes > 228 * 1024 {
        return Err(SimError::new(
            e.line,
            format!("{shared_bytes} bytes of shared memory per CTA (more than 228 KiB)"),
        ));
    }
    let mut report = SimReport { shared_bytes, ..SimReport::default() };
    let nwarps = nthreads.div_ceil(32) as usize;
    let mut regs = vec![0u64; e.nregs * nthreads as usize];
    for z in 0..grid[2] {
        for y in 0..grid[1] {
            for x in 0..grid[0] {
                let mut cta = Cta {
                    e,
                    ctaid: [x, y, z],
                    grid,
                    block,
                    params: &pbytes,
                    shared: vec![0; shared_bytes],
                    init: vec![false; shared_bytes],
                    writer: vec![NONE; shared_bytes],
                    reader: vec![NONE; shared_bytes],
                    uni: vec![(NONE, vec![]); nwarps],
                    uni_seq: vec![0; nthreads as usize],
                    instructions: 0,
                };
                regs.fill(0);
                let mut pcs = vec![0usize; nthreads as usize];
                let mut states = vec![State::Ready; nthreads as usize];
                loop {
                    for t in 0..nthreads {
                        if states[t as usize] == State::Exited {
                            continue;
                        }
                        let r = &mut regs[t as usize * e.nregs..(t as usize + 1) * e.nregs];
                        states[t as usize] = run_thread(&mut cta, t, r, &mut pcs[t as usize], memory, limits)?;
                    }
                    // Every bra.uni log must have been followed by every thread of the warp.
                    for t in 0..nthreads {
                        let (_, log) = &cta.uni[(t / 32) as usize];
                        if cta.uni_seq[t as usize] != log.len() {
                            let line = log.get(cta.uni_seq[t as usize]).map_or(0, |(i, _)| e.instrs[*i].line);
                            return Err(SimError::new(
                                line,
                                format!(
                                    "divergent bra.uni: {} took {} uniform branches, its warp {}",
                                    cta.who(t),
                                    cta.uni_seq[t as usize],
                                    log.len()
                                ),
                            ));
                        }
                    }
                    let exited = states.iter().filter(|s| **s == State::Exited).count();
                    if exited == nthreads as usize {
                        break;
                    }
                    let first = states.iter().position(|s| *s != State::Exited).expect("one is waiting");
                    let State::AtBarrier(at, id) = states[first] else {
                        unreachable!("threads stop at barriers or exit")
                    };
                    let line = e.instrs[at].line;
                    if exited > 0 {
                        let t = states.iter().position(|s| *s == State::Exited).expect("one exited") as u32;
                        return Err(SimError::new(
                            line,
                            format!(
                                "bar.sync reached by only {} of {nthreads} threads of CTA {:?}: {exited} exited (e.g. {})",
                                nthreads as usize - exited,
                                cta.ctaid,
                                cta.who(t)
                            ),
                        ));
                    }
                    if let Some(t) = states.iter().position(|s| *s != State::AtBarrier(at, id)) {
                        let State::AtBarrier(other, oid) = states[t] else { unreachable!() };
                        return Err(SimError::new(
                            line,
                            format!(
                                "bar.sync {id} at line {line} reached by only part of CTA {:?}: {} waits at bar.sync {oid} on line {}",
                                cta.ctaid,
                                cta.who(t as u32),
                                e.instrs[other].line
                            ),
                        ));
                    }
                    report.barriers += 1;
                    for pc in &mut pcs {
                        *pc += 1;
                    }
                    cta.writer.fill(NONE);
                    cta.reader.fill(NONE);
                    for w in &mut cta.uni {
                        *w = (NONE, vec![]);
                    }
                    cta.uni_seq.fill(0);
                }
                report.instructions += cta.instructions;
                report.ctas += 1;
            }
        }
    }
    Ok(report)
}

fn run_thread(
    cta: &mut Cta,
    t: u32,
    regs: &mut [u64],
    pc: &mut usize,
    memory: &mut GlobalMemory,
    limits: LaunchLimits,
) -> Result<State, SimError> {
    let e = cta.e;
    let mut steps = 0u64;
    loop {
        let Some(ins) = e.instrs.get(*pc) else {
            return Ok(State::Exited); // falling off the end of the body
        };
        steps += 1;
        if steps > limits.max_steps_per_thread {
            cta.instructions += steps;
            return Err(SimError::new(
                ins.line,
                format!("{} ran more than {} instructions without a barrier", cta.who(t), limits.max_steps_per_thread),
            ));
        }
        let on = match ins.guard {
            Some((p, neg)) => (regs[p as usize] != 0) != neg,
            None => true,
        };
        if let Op::Bra { target, uni: true } = ins.op {
            check_uni(cta, t, *pc, on)?;
            let _ = target;
        }
        if !on {
            *pc += 1;
            continue;
        }
        match step(cta, t, ins, regs, memory) {
            Ok(Flow::Next) => *pc += 1,
            Ok(Flow::Jump(to)) => *pc = to,
            Ok(Flow::Exit) => {
                cta.instructions += steps;
                return Ok(State::Exited);
            }
            Ok(Flow::Barrier(id)) => {
                cta.instructions += steps;
                return Ok(State::AtBarrier(*pc, id));
            }
            Err(msg) => {
                cta.instructions += steps;
                return Err(SimError::new(ins.line, msg));
            }
        }
    }
}

fn check_uni(cta: &mut Cta, t: u32, pc: usize, taken: bool) -> Result<(), SimError> {
    let w = (t / 32) as usize;
    let seq = cta.uni_seq[t as usize];
    cta.uni_seq[t as usize] += 1;
    let (owner, log) = &mut cta.uni[w];
    if *owner == NONE {
        *owner = t;
    }
    if *owner == t {
        log.push((pc, taken));
        return Ok(());
    }
    match log.get(seq) {
        Some(&(p, tk)) if p == pc && tk == taken => Ok(()),
        Some(&(p, tk)) => {
            let line = cta.e.instrs[pc].line;
            let o = *owner;
            Err(SimError::new(
                line,
                format!(
                    "divergent bra.uni: {} {} here, thread {} of its warp {} at line {}",
                    cta.who(t),
                    if taken { "branches" } else { "falls through" },
                    cta.tid(o)[0],
                    if tk { "branched" } else { "fell through" },
                    cta.e.instrs[p].line
                ),
            ))
        }
        None => Err(SimError::new(
            cta.e.instrs[pc].line,
            format!("divergent bra.uni: {} reaches a uniform branch its warp's first thread did not", cta.who(t)),
        )),
    }
}

enum Flow {
    Next,
    Jump(usize),
    Exit,
    Barrier(u64),
}

fn src(cta: &Cta, t: u32, regs: &[u64], s: Src) -> u64 {
    match s {
        Src::Reg(r) => regs[r as usize],
        Src::Imm(v) => v,
        Src::Special(sp) => match sp {
            Special::Tid(d) => cta.tid(t)[d] as u64,
            Special::Ntid(d) => cta.block[d] as u64,
            Special::Ctaid(d) => cta.ctaid[d] as u64,
            Special::Nctaid(d) => cta.grid[d] as u64,
            Special::LaneId => (t % 32) as u64,
            Special::WarpId => (t / 32) as u64,
        },
    }
}

fn step(cta: &mut Cta, t: u32, ins: &Instr, regs: &mut [u64], memory: &mut GlobalMemory) -> Result<Flow, String> {
    let v = |s: Src| src(cta, t, regs, s);
    match ins.op {
        Op::Mov { ty, d, a } => regs[d as usize] = mask(ty, v(a)),
        Op::Cvt { dty, sty, rnd, ftz, d, a } => {
            let x = v(a);
            regs[d as usize] = cvt(dty, sty, rnd, ftz, x);
        }
        Op::Cvta { to, space, ty, d, a } => {
            let x = v(a);
            let r = match (space, to) {
                (Space::Shared, true) => x.wrapping_sub(SHARED_WINDOW),
                (Space::Shared, false) => x.wrapping_add(SHARED_WINDOW),
                _ => x,
            };
            regs[d as usize] = mask(ty, r);
        }
        Op::Ld { space, ty, d, addr } => {
            let a = addr.base.map_or(0, |r| regs[r as usize]).wrapping_add(addr.off as u64);
            let mut buf = [0u8; 8];
            let n = ty.bytes();
            load(cta, t, space, a, &mut buf[..n], memory)?;
            regs[d as usize] = u64::from_le_bytes(buf);
        }
        Op::St { space, ty, addr, a } => {
            let at = addr.base.map_or(0, |r| regs[r as usize]).wrapping_add(addr.off as u64);
            let x = v(a).to_le_bytes();
            store(cta, t, space, at, &x[..ty.bytes()], memory)?;
        }
        Op::Bin { op, ty, ftz, d, a, b } => {
            let r = binary(op, ty, ftz, v(a), v(b))?;
            regs[d as usize] = r;
        }
        Op::Mad { mode, ty, ftz, d, a, b, c } => {
            let (x, y, z) = (v(a), v(b), v(c));
            regs[d as usize] = match (mode, ty) {
                (MadMode::Fma, Ty::F32) => {
                    let r = ftz32(f32v(x), ftz).mul_add(ftz32(f32v(y), ftz), ftz32(f32v(z), ftz));
                    ftz32(r, ftz).to_bits() as u64
                }
                (MadMode::Fma, _) => f64v(x).mul_add(f64v(y), f64v(z)).to_bits(),
                (MadMode::Lo, _) => mask(ty, x.wrapping_mul(y).wrapping_add(z)),
                (MadMode::Hi, _) => {
                    let p = ival(ty, x).wrapping_mul(ival(ty, y)) >> ty.bits();
                    mask(ty, (p as u64).wrapping_add(z))
                }
                (MadMode::Wide, _) => {
                    let p = ival(ty, x).wrapping_mul(ival(ty, y)) as u64;
                    p.wrapping_add(z)
                }
            };
        }
        Op::Un { op, ty, ftz, d, a } => regs[d as usize] = unary(op, ty, ftz, v(a)),
        Op::Setp { cmp, ty, ftz, p, a, b, combine } => {
            let mut r = compare(cmp, ty, ftz, v(a), v(b));
            if let Some((bop, c)) = combine {
                let c = v(c) != 0;
                r = match bop {
                    BoolOp::And => r && c,
                    BoolOp::Or => r || c,
                    BoolOp::Xor => r != c,
                };
            }
            regs[p as usize] = u64::from(r);
        }
        Op::Selp { ty, d, a, b, p } => {
            let r = if v(p) != 0 { v(a) } else { v(b) };
            regs[d as usize] = mask(ty, r);
        }
        Op::Bra { target, .. } => return Ok(Flow::Jump(target)),
        Op::Exit => return Ok(Flow::Exit),
        Op::Bar { id } => return Ok(Flow::Barrier(v(id))),
    }
    Ok(Flow::Next)
}

fn cvt(dty: Ty, sty: Ty, rnd: Rnd, ftz: bool, x: u64) -> u64 {
    let round = |f: f64| match rnd {
        Rnd::Rni => f.round_ties_even(),
        Rnd::Rzi => f.trunc(),
        Rnd::Rmi => f.floor(),
        Rnd::Rpi => f.ceil(),
        Rnd::Rn | Rnd::None => f,
    };
    let fin = |f: f64| -> f64 {
        if sty == Ty::F32 {
            ftz32(f32v(x), ftz) as f64
        } else {
            f
        }
    };
    match (dty.is_float(), sty.is_float()) {
        (false, false) => mask(dty, ival(sty, x) as u64),
        (true, false) => {
            let i = ival(sty, x);
            match dty {
                Ty::F32 => (if sty.is_signed() { i as i64 as f32 } else { i as u64 as f32 }).to_bits() as u64,
                _ => (if sty.is_signed() { i as i64 as f64 } else { i as u64 as f64 }).to_bits(),
            }
        }
        (false, true) => {
            let f = round(fin(f64v(x)));
            // float -> int saturates; NaN -> 0 (as Rust's `as`).
            match dty {
                Ty::S32 => f as i32 as u32 as u64,
                Ty::U32 | Ty::B32 => f as u32 as u64,
                Ty::S64 => f as i64 as u64,
                _ => f as u64,
            }
        }
        (true, true) => {
            let f = match sty {
                Ty::F32 => ftz32(f32v(x), ftz) as f64,
                _ => f64v(x),
            };
            let f = round(f);
            match dty {
                Ty::F32 => ftz32(f as f32, ftz).to_bits() as u64,
                _ => f.to_bits(),
            }
        }
    }
}

/// The float ops of `binary`, in f64; the op back when it is not a float op.
fn float_binary(op: BinOp, x: f64, y: f64) -> Result<f64, BinOp> {
    Ok(match op {
        BinOp::Add => x + y,
        BinOp::Sub => x - y,
        BinOp::MulLo => x * y,
        BinOp::Div => x / y,
        BinOp::Min => x.min(y),
        BinOp::Max => x.max(y),
        BinOp::MinNaN | BinOp::MaxNaN if x.is_nan() || y.is_nan() => f64::NAN,
        BinOp::MinNaN => x.min(y),
        BinOp::MaxNaN => x.max(y),
        _ => return Err(op),
    })
}

fn binary(op: BinOp, ty: Ty, ftz: bool, a: u64, b: u64) -> Result<u64, String> {
    if ty == Ty::F32 {
        // Widening to f64, one f64 op and one rounding to f32 gives exactly the f32 result
        // for + - * / (f64 carries more than 2*24+2 bits) and for min/max.
        let (x, y) = (ftz32(f32v(a), ftz) as f64, ftz32(f32v(b), ftz) as f64);
        let r = float_binary(op, x, y).map_err(|op| format!("{op:?} is not defined on f32"))? as f32;
        return Ok(ftz32(r, ftz).to_bits() as u64);
    }
    if ty == Ty::F64 {
        let r = float_binary(op, f64v(a), f64v(b)).map_err(|op| format!("{op:?} is not defined on f64"))?;
        return Ok(r.to_bits());
    }
    let w = ty.bits();
    let (x, y) = (ival(ty, a), ival(ty, b));
    let r: u64 = match op {
        BinOp::Add => a.wrapping_add(b),
        BinOp::Sub => a.wrapping_sub(b),
        BinOp::MulLo => a.wrapping_mul(b),
        BinOp::MulHi => (x.wrapping_mul(y) >> w) as u64,
        BinOp::MulWide => return Ok(x.wrapping_mul(y) as u64),
        BinOp::Div | BinOp::Rem => {
            if y == 0 {
                return Err("integer division by zero".into());
            }
            // i128 covers the full range of s64/u64, so no overflow (s64 MIN / -1 wraps).
            let q = if op == BinOp::Div { x.wrapping_div(y) } else { x.wrapping_rem(y) };
            q as u64
        }
        BinOp::Min => x.min(y) as u64,
        BinOp::Max => x.max(y) as u64,
        BinOp::MinNaN | BinOp::MaxNaN => return Err(".NaN on integers".into()),
        BinOp::Shl => {
            let s = b as u32;
            if s >= w {
                0
            } else {
                a << s
            }
        }
        BinOp::Shr => {
            let s = b as u32;
            if ty.is_signed() {
                (x >> s.min(w - 1)) as u64
            } else if s >= w {
                0
            } else {
                (x >> s) as u64
            }
        }
        BinOp::And => a & b,
        BinOp::Or => a | b,
        BinOp::Xor => a ^ b,
    };
    Ok(mask(ty, r))
}

fn unary(op: UnOp, ty: Ty, ftz: bool, a: u64) -> u64 {
    match ty {
        Ty::F32 => {
            let x = ftz32(f32v(a), ftz);
            let xd = x as f64;
            let r = match op {
                UnOp::Neg => -x,
                UnOp::Abs => x.abs(),
                // Computed in f64 and rounded once; the GPU's .approx is within 2 ulp.
                UnOp::Ex2 => xd.exp2() as f32,
                UnOp::Lg2 => xd.log2() as f32,
                UnOp::Rcp => 1.0 / x,
                UnOp::Sqrt => x.sqrt(),
                UnOp::Rsqrt => (1.0 / xd.sqrt()) as f32,
                UnOp::Sin => xd.sin() as f32,
                UnOp::Cos => xd.cos() as f32,
                UnOp::Not => unreachable!("rejected by the decoder"),
            };
            ftz32(r, ftz).to_bits() as u64
        }
        Ty::F64 => {
            let x = f64v(a);
            let r = match op {
                UnOp::Neg => -x,
                UnOp::Abs => x.abs(),
                UnOp::Ex2 => x.exp2(),
                UnOp::Lg2 => x.log2(),
                UnOp::Rcp => 1.0 / x,
                UnOp::Sqrt => x.sqrt(),
                UnOp::Rsqrt => 1.0 / x.sqrt(),
                UnOp::Sin => x.sin(),
                UnOp::Cos => x.cos(),
                UnOp::Not => unreachable!("rejected by the decoder"),
            };
            r.to_bits()
        }
        Ty::Pred => u64::from(a == 0),
        _ => match op {
            UnOp::Neg => mask(ty, a.wrapping_neg()),
            UnOp::Abs => mask(ty, ival(ty, a).unsigned_abs() as u64),
            _ => mask(ty, !a),
        },
    }
}

fn compare(cmp: Cmp, ty: Ty, ftz: bool, a: u64, b: u64) -> bool {
    if ty.is_float() {
        let (x, y) =
            if ty == Ty::F32 { (ftz32(f32v(a), ftz) as f64, ftz32(f32v(b), ftz) as f64) } else { (f64v(a), f64v(b)) };
        let nan = x.is_nan() || y.is_nan();
        return match cmp {
            Cmp::Eq => x == y,
            Cmp::Ne => !nan && x != y,
            Cmp::Lt => x < y,
            Cmp::Le => x <= y,
            Cmp::Gt => x > y,
            Cmp::Ge => x >= y,
            Cmp::Equ => nan || x == y,
            Cmp::Neu => nan || x != y,
            Cmp::Ltu => nan || x < y,
            Cmp::Leu => nan || x <= y,
            Cmp::Gtu => nan || x > y,
            Cmp::Geu => nan || x >= y,
            Cmp::Num => !nan,
            Cmp::Nan => nan,
            Cmp::Lo | Cmp::Ls | Cmp::Hi | Cmp::Hs => unreachable!("rejected by the decoder"),
        };
    }
    let (x, y) = (ival(ty, a), ival(ty, b));
    let (ux, uy) = (mask(ty, a), mask(ty, b));
    match cmp {
        Cmp::Eq => x == y,
        Cmp::Ne => x != y,
        Cmp::Lt => x < y,
        Cmp::Le => x <= y,
        Cmp::Gt => x > y,
        Cmp::Ge => x >= y,
        Cmp::Lo => ux < uy,
        Cmp::Ls => ux <= uy,
        Cmp::Hi => ux > uy,
        Cmp::Hs => ux >= uy,
        _ => unreachable!("rejected by the decoder"),
    }
}

fn resolve(space: Space, a: u64, shared_len: usize) -> (Space, u64) {
    match space {
        Space::Generic if a >= SHARED_WINDOW && a - SHARED_WINDOW < shared_len as u64 => {
            (Space::Shared, a - SHARED_WINDOW)
        }
        Space::Generic => (Space::Global, a),
        s => (s, a),
    }
}

fn check_align(a: u64, n: usize, what: &str, cta: &Cta, t: u32) -> Result<(), String> {
    if !a.is_multiple_of(n as u64) {
        return Err(format!("misaligned {what} of {n} bytes at {a:#x} by {}", cta.who(t)));
    }
    Ok(())
}

fn load(cta: &mut Cta, t: u32, space: Space, a: u64, out: &mut [u8], mem: &GlobalMemory) -> Result<(), String> {
    let n = out.len();
    let (space, a) = resolve(space, a, cta.shared.len());
    match space {
        Space::Param => {
            let o = a as usize;
            if o.checked_add(n).is_none_or(|end| end > cta.params.len()) {
                return Err(format!("out-of-bounds parameter load at offset {a} by {}", cta.who(t)));
            }
            out.copy_from_slice(&cta.params[o..o + n]);
        }
        Space::Global | Space::Generic => {
            check_align(a, n, "global load", cta, t)?;
            let src = mem.bytes(a, n).ok_or_else(|| {
                format!("out-of-bounds global load of {n} bytes at {a:#x} by {} (outside every buffer)", cta.who(t))
            })?;
            out.copy_from_slice(src);
        }
        Space::Shared => {
            let o = shared_range(cta, t, a, n, "load")?;
            for i in o..o + n {
                if !cta.init[i] {
                    return Err(format!("read of uninitialised shared memory at {a:#x} (byte {i}) by {}", cta.who(t)));
                }
                let w = cta.writer[i];
                if w != NONE && w != t {
                    return Err(format!(
                        "shared-memory race at {i:#x}: {} reads what {} wrote since the last barrier",
                        cta.who(t),
                        cta.who(w)
                    ));
                }
                let r = &mut cta.reader[i];
                if *r == NONE {
                    *r = t;
                } else if *r != t {
                    *r = MANY;
                }
            }
            out.copy_from_slice(&cta.shared[o..o + n]);
        }
    }
    Ok(())
}

fn shared_range(cta: &Cta, t: u32, a: u64, n: usize, what: &str) -> Result<usize, String> {
    if a.checked_add(n as u64).is_none_or(|end| end > cta.shared.len() as u64) {
        return Err(format!(
            "out-of-bounds shared {what} of {n} bytes at {a:#x} by {} (shared memory is {} bytes)",
            cta.who(t),
            cta.shared.len()
        ));
    }
    check_align(a, n, &format!("shared {what}"), cta, t)?;
    Ok(a as usize)
}

fn store(cta: &mut Cta, t: u32, space: Space, a: u64, x: &[u8], mem: &mut GlobalMemory) -> Result<(), String> {
    let n = x.len();
    let (space, a) = resolve(space, a, cta.shared.len());
    match space {
        Space::Param => Err("st.param".into()),
        Space::Global | Space::Generic => {
            check_align(a, n, "global store", cta, t)?;
            let who = cta.who(t);
            let dst = mem.bytes_mut(a, n).ok_or_else(|| {
                format!("out-of-bounds global store of {n} bytes at {a:#x} by {who} (outside every buffer)")
            })?;
            dst.copy_from_slice(x);
            Ok(())
        }
        Space::Shared => {
            let o = shared_range(cta, t, a, n, "store")?;
            for i in o..o + n {
                let w = cta.writer[i];
                if w != NONE && w != t {
                    return Err(format!(
                        "shared-memory race at {i:#x}: {} and {} both write it between two barriers",
                        cta.who(w),
                        cta.who(t)
                    ));
                }
                let r = cta.reader[i];
                if r != NONE && r != t {
                    let other = if r == MANY { "several threads".to_string() } else { cta.who(r) };
                    return Err(format!(
                        "shared-memory race at {i:#x}: {} writes what {other} read since the last barrier",
                        cta.who(t)
                    ));
                }
                cta.writer[i] = t;
                cta.init[i] = true;
            }
            cta.shared[o..o + n].copy_from_slice(x);
            Ok(())
        }
    }
}
