//! The interpreter: CTAs one after another; inside a CTA, warps one after another from
//! barrier to barrier, and inside a warp, lanes one at a time up to the next warp-collective
//! instruction, which then runs once for the whole warp (lock-step where it matters).

use super::cpasync::{Copy, Queue};
use super::half;
use super::parse::*;
use super::shared::{Shared, Who, NONE};
use super::warp::{self, Lanes, ShflIn};
use super::{GlobalMemory, LaunchLimits, SimError, SimParam, SimReport, SHARED_WINDOW};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Ready,
    /// Waiting at the barrier instruction with this index (and barrier id).
    AtBarrier(usize, u64),
    /// Waiting for the rest of its warp at the collective instruction with this index.
    AtCollective(usize),
    Exited,
}

struct Cta<'a> {
    e: &'a Entry,
    ctaid: [u32; 3],
    grid: [u32; 3],
    block: [u32; 3],
    params: &'a [u8],
    sh: Shared,
    /// Per warp: the owner thread of this epoch's `bra.uni` log, and the log.
    uni: Vec<(u32, Vec<(usize, bool)>)>,
    uni_seq: Vec<usize>,
    /// Per thread: instructions since the last barrier (runaway check).
    steps: Vec<u64>,
    /// Per thread: its `cp.async` copies in flight.
    asyncq: Vec<Queue>,
    instructions: u64,
}

impl Cta<'_> {
    fn tid(&self, t: u32) -> [u32; 3] {
        self.sh.who.tid(t)
    }
    fn who(&self, t: u32) -> String {
        self.sh.who.who(t)
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
        16 => v & 0xFFFF,
        8 => v & 1,
        _ => v,
    }
}
/// The integer value of `v` as an i128 (sign- or zero-extended by `ty`).
fn ival(ty: Ty, v: u64) -> i128 {
    match (ty.bits(), ty.is_signed()) {
        (16, true) => v as u16 as i16 as i128,
        (16, false) => v as u16 as i128,
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
    // One shared memory (and checker state) for all CTAs, reset between them.
    let mut shared = Shared::new(shared_bytes, nwarps, Who { block, ctaid: [0; 3] });
    for z in 0..grid[2] {
        for y in 0..grid[1] {
            for x in 0..grid[0] {
                shared.reset(Who { block, ctaid: [x, y, z] });
                let mut cta = Cta {
                    e,
                    ctaid: [x, y, z],
                    grid,
                    block,
                    params: &pbytes,
                    sh: shared,
                    uni: vec![(NONE, vec![]); nwarps],
                    uni_seq: vec![0; nthreads as usize],
                    steps: vec![0; nthreads as usize],
                    asyncq: vec![Queue::default(); nthreads as usize],
                    instructions: 0,
                };
                regs.fill(0);
                let mut pcs = vec![0usize; nthreads as usize];
                let mut states = vec![State::Ready; nthreads as usize];
                loop {
                    for w in 0..nwarps as u32 {
                        let lo = w * 32;
                        let hi = (lo + 32).min(nthreads);
                        run_warp(&mut cta, lo, hi, &mut regs, &mut pcs, &mut states, memory, limits)?;
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
                        unreachable!("after run_warp, threads wait at barriers or have exited")
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
                    for (pc, st) in pcs.iter_mut().zip(states.iter_mut()) {
                        *pc += 1;
                        *st = State::Ready;
                    }
                    cta.sh.barrier();
                    cta.steps.fill(0);
                    for w in &mut cta.uni {
                        *w = (NONE, vec![]);
                    }
                    cta.uni_seq.fill(0);
                }
                report.instructions += cta.instructions;
                report.ctas += 1;
                shared = cta.sh;
            }
        }
    }
    Ok(report)
}

/// Runs the lanes `lo..hi` of one warp until each waits at a barrier or has exited,
/// executing each warp-collective instruction once all its participants reached it.
#[allow(clippy::too_many_arguments)]
fn run_warp(
    cta: &mut Cta,
    lo: u32,
    hi: u32,
    regs: &mut [u64],
    pcs: &mut [usize],
    states: &mut [State],
    memory: &mut GlobalMemory,
    limits: LaunchLimits,
) -> Result<(), SimError> {
    let nregs = cta.e.nregs;
    loop {
        for t in lo..hi {
            if states[t as usize] == State::Ready {
                let r = &mut regs[t as usize * nregs..(t as usize + 1) * nregs];
                states[t as usize] = run_thread(cta, t, r, &mut pcs[t as usize], memory, limits)?;
            }
        }
        // Run the first collective whose participants are all there; if none is ready, the
        // lowest waiting lane's one is divergent.
        let mut ready = None;
        let mut first_err = None;
        for t0 in lo..hi {
            let State::AtCollective(pc) = states[t0 as usize] else { continue };
            match participants(cta, pc, t0, lo, hi, regs, states) {
                Ok(m) => {
                    ready = Some((pc, m));
                    break;
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        let Some((pc, members)) = ready else {
            return match first_err {
                Some(e) => Err(e),
                None => Ok(()),
            };
        };
        collective(cta, pc, members, lo, hi, regs)?;
        for t in lo..hi {
            if members & (1 << (t - lo)) != 0 {
                states[t as usize] = State::Ready;
                pcs[t as usize] = pc + 1;
            }
        }
    }
}

/// Where a lane stands, for messages.
fn whereabouts(cta: &Cta, st: State) -> String {
    match st {
        State::Exited => "has exited".into(),
        State::AtBarrier(i, _) => format!("waits at bar.sync on line {}", cta.e.instrs[i].line),
        State::AtCollective(i) => format!("waits at line {}", cta.e.instrs[i].line),
        State::Ready => "is running".into(),
    }
}

fn collective_name(op: &Op) -> &'static str {
    match op {
        Op::Shfl { .. } => "shfl.sync",
        Op::Mma(_) => "mma.sync",
        Op::Ldmatrix { .. } => "ldmatrix",
        _ => "bar.warp.sync",
    }
}

/// The participants (as a lane mask) of the collective instruction `pc` that lane `t0`
/// waits at: the membermask for shfl/bar.warp.sync, the full warp for the `.aligned`
/// mma/ldmatrix. An error unless every participant waits at this very instruction with the
/// same membermask.
fn participants(
    cta: &Cta,
    pc: usize,
    t0: u32,
    lo: u32,
    hi: u32,
    regs: &[u64],
    states: &[State],
) -> Result<u32, SimError> {
    let e = cta.e;
    let ins = &e.instrs[pc];
    let nregs = e.nregs;
    let err = |m: String| SimError::new(ins.line, m);
    let lane_regs = |t: u32| t as usize * nregs..(t as usize + 1) * nregs;
    let warp_lanes = hi - lo;
    let full: u32 = if warp_lanes == 32 { u32::MAX } else { (1 << warp_lanes) - 1 };
    let name = collective_name(&ins.op);
    let members = match ins.op {
        Op::Shfl { mask, .. } | Op::WarpSync { mask } => {
            let m = src(cta, t0, &regs[lane_regs(t0)], mask) as u32;
            if m & !full != 0 {
                return Err(err(format!(
                    "{name}: membermask {m:#010x} names lanes that do not exist (the warp of {} has {warp_lanes})",
                    cta.who(t0)
                )));
            }
            if m & (1 << (t0 - lo)) == 0 {
                return Err(err(format!("{name}: {} executes it but is not in its membermask {m:#010x}", cta.who(t0))));
            }
            m
        }
        _ => {
            if warp_lanes != 32 {
                return Err(err(format!(
                    "{name} needs a full warp; the warp of {} has {warp_lanes} threads",
                    cta.who(t0)
                )));
            }
            full
        }
    };
    for t in lo..hi {
        if members & (1 << (t - lo)) == 0 {
            continue;
        }
        if states[t as usize] != State::AtCollective(pc) {
            return Err(err(format!(
                "divergent collective: {} waits at this {name}, but {} of the same warp {}",
                cta.who(t0),
                cta.who(t),
                whereabouts(cta, states[t as usize])
            )));
        }
        if let Op::Shfl { mask, .. } | Op::WarpSync { mask } = ins.op {
            let m = src(cta, t, &regs[lane_regs(t)], mask) as u32;
            if m != members {
                return Err(err(format!(
                    "{name}: {} uses membermask {m:#010x}, {} uses {members:#010x}",
                    cta.who(t),
                    cta.who(t0)
                )));
            }
        }
    }
    Ok(members)
}

/// Executes the collective instruction `pc` for the lanes in `members`.
fn collective(cta: &mut Cta, pc: usize, members: u32, lo: u32, hi: u32, regs: &mut [u64]) -> Result<(), SimError> {
    let e = cta.e;
    let ins = &e.instrs[pc];
    let nregs = e.nregs;
    let line = ins.line;
    let err = |m: String| SimError::new(line, m);
    let lane_regs = |t: u32| t as usize * nregs..(t as usize + 1) * nregs;
    let full: u32 = if hi - lo == 32 { u32::MAX } else { (1 << (hi - lo)) - 1 };
    cta.instructions += members.count_ones() as u64;
    match &ins.op {
        Op::Shfl { mode, d, p, a, b, c, .. } => {
            let mut input = [ShflIn::default(); 32];
            for t in lo..hi {
                if members & (1 << (t - lo)) != 0 {
                    let r = &regs[lane_regs(t)];
                    input[(t - lo) as usize] = ShflIn {
                        a: src(cta, t, r, *a) as u32,
                        b: src(cta, t, r, *b) as u32,
                        c: src(cta, t, r, *c) as u32,
                    };
                }
            }
            let out = warp::shfl(*mode, members, &input).map_err(err)?;
            for t in lo..hi {
                if members & (1 << (t - lo)) != 0 {
                    let (v, ok) = out[(t - lo) as usize];
                    let r = &mut regs[lane_regs(t)];
                    r[*d as usize] = v as u64;
                    if let Some(p) = p {
                        r[*p as usize] = u64::from(ok);
                    }
                }
            }
        }
        Op::Mma(m) => {
            let mut cv = [[0u32; 4]; 32];
            for t in lo..hi {
                let r = &regs[lane_regs(t)];
                for (slot, s) in cv[(t - lo) as usize].iter_mut().zip(m.c) {
                    *slot = src(cta, t, r, s) as u32;
                }
            }
            warp::mma(m, &mut Lanes { regs, lo: lo as usize, nregs }, &cv);
        }
        Op::Ldmatrix { num, trans, d, addr, space } => {
            let mut addrs = [0u64; 32];
            for t in lo..hi {
                let a = eff(addr, &regs[lane_regs(t)]);
                addrs[(t - lo) as usize] = match space {
                    Space::Shared => a,
                    _ if a >= SHARED_WINDOW && a - SHARED_WINDOW < cta.sh.len() as u64 => a - SHARED_WINDOW,
                    _ if (t - lo) < 8 * *num as u32 => {
                        return Err(err(format!(
                            "ldmatrix: generic address {a:#x} of {} is not in shared memory",
                            cta.who(t)
                        )))
                    }
                    _ => 0,
                };
            }
            let out = warp::ldmatrix(*num as usize, *trans, &addrs, lo, &mut cta.sh).map_err(err)?;
            for t in lo..hi {
                let r = &mut regs[lane_regs(t)];
                for (i, reg) in d.iter().enumerate().take(*num as usize) {
                    r[*reg as usize] = out[(t - lo) as usize][i] as u64;
                }
            }
        }
        Op::WarpSync { .. } => {
            // Only a full-warp sync orders the warp's lanes in the race detector (a partial
            // one would need per-lane clocks; treating it as no ordering is conservative).
            if members == full {
                cta.sh.warp_sync((lo / 32) as usize);
            }
        }
        _ => unreachable!("not a collective"),
    }
    Ok(())
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
    let start = cta.steps[t as usize];
    let mut steps = start;
    let result = loop {
        let Some(ins) = e.instrs.get(*pc) else {
            break Ok(State::Exited); // falling off the end of the body
        };
        steps += 1;
        if steps > limits.max_steps_per_thread {
            break Err(SimError::new(
                ins.line,
                format!("{} ran more than {} instructions without a barrier", cta.who(t), limits.max_steps_per_thread),
            ));
        }
        let on = match ins.guard {
            Some((p, neg)) => (regs[p as usize] != 0) != neg,
            None => true,
        };
        if let Op::Bra { uni: true, .. } = ins.op {
            if let Err(e) = check_uni(cta, t, *pc, on) {
                break Err(e);
            }
        }
        if !on {
            *pc += 1;
            continue;
        }
        if ins.op.is_collective() {
            // Counted when the whole warp executes it.
            steps -= 1;
            break Ok(State::AtCollective(*pc));
        }
        match step(cta, t, ins, regs, memory) {
            Ok(Flow::Next) => *pc += 1,
            Ok(Flow::Jump(to)) => *pc = to,
            Ok(Flow::Exit) => break Ok(State::Exited),
            Ok(Flow::Barrier(id)) => break Ok(State::AtBarrier(*pc, id)),
            Err(msg) => break Err(SimError::new(ins.line, msg)),
        }
    };
    cta.steps[t as usize] = steps;
    cta.instructions += steps - start;
    result
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

/// The effective address of `[base + off]`.
fn eff(addr: &Addr, regs: &[u64]) -> u64 {
    addr.base.map_or(0, |r| regs[r as usize]).wrapping_add(addr.off as u64)
}

fn step(cta: &mut Cta, t: u32, ins: &Instr, regs: &mut [u64], memory: &mut GlobalMemory) -> Result<Flow, String> {
    let v = |s: Src| src(cta, t, regs, s);
    match &ins.op {
        &Op::Mov { ty, d, a } => regs[d as usize] = mask(ty, v(a)),
        &Op::Cvt { dty, sty, rnd, ftz, d, a } => {
            let x = v(a);
            regs[d as usize] = cvt(dty, sty, rnd, ftz, x);
        }
        &Op::Cvta { to, space, ty, d, a } => {
            let x = v(a);
            let r = match (space, to) {
                (Space::Shared, true) => x.wrapping_sub(SHARED_WINDOW),
                (Space::Shared, false) => x.wrapping_add(SHARED_WINDOW),
                _ => x,
            };
            regs[d as usize] = mask(ty, r);
        }
        &Op::Ld { space, ty, d, addr } => {
            let a = eff(&addr, regs);
            let mut buf = [0u8; 8];
            let n = ty.bytes();
            load(cta, t, space, a, &mut buf[..n], memory)?;
            regs[d as usize] = u64::from_le_bytes(buf);
        }
        &Op::St { space, ty, addr, a } => {
            let at = eff(&addr, regs);
            let x = v(a).to_le_bytes();
            store(cta, t, space, at, &x[..ty.bytes()], memory)?;
        }
        &Op::Bin { op, ty, ftz, d, a, b } => {
            let r = binary(op, ty, ftz, v(a), v(b))?;
            regs[d as usize] = r;
        }
        &Op::Mad { mode, ty, ftz, d, a, b, c } => {
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
        &Op::Un { op, ty, ftz, d, a } => regs[d as usize] = unary(op, ty, ftz, v(a)),
        &Op::Setp { cmp, ty, ftz, p, a, b, combine } => {
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
        &Op::Selp { ty, d, a, b, p } => {
            let r = if v(p) != 0 { v(a) } else { v(b) };
            regs[d as usize] = mask(ty, r);
        }
        &Op::Bra { target, .. } => return Ok(Flow::Jump(target)),
        Op::Exit => return Ok(Flow::Exit),
        &Op::Bar { id } => return Ok(Flow::Barrier(v(id))),
        &Op::LdSext { space, d, addr, bits } => {
            let a = eff(&addr, regs);
            let mut buf = [0u8; 2];
            load(cta, t, space, a, &mut buf, memory)?;
            let x = i16::from_le_bytes(buf) as i64 as u64;
            regs[d as usize] = if bits == 32 { x & 0xFFFF_FFFF } else { x };
        }
        &Op::LdV { space, ty, n, d, addr } => {
            let a = eff(&addr, regs);
            let size = ty.bytes();
            let mut buf = [0u8; 32];
            let total = size * n as usize;
            load(cta, t, space, a, &mut buf[..total], memory)?;
            for (i, reg) in d.iter().enumerate().take(n as usize) {
                let mut e = [0u8; 8];
                e[..size].copy_from_slice(&buf[i * size..(i + 1) * size]);
                regs[*reg as usize] = u64::from_le_bytes(e);
            }
        }
        Op::StV(sv) => {
            let at = eff(&sv.addr, regs);
            let size = sv.ty.bytes();
            let mut buf = [0u8; 32];
            for (i, s) in sv.a.iter().enumerate().take(sv.n as usize) {
                buf[i * size..(i + 1) * size].copy_from_slice(&v(*s).to_le_bytes()[..size]);
            }
            store(cta, t, sv.space, at, &buf[..size * sv.n as usize], memory)?;
        }
        &Op::Pack { bits, n, d, a } => {
            let mut x = 0u64;
            for (i, r) in a.iter().enumerate().take(n as usize) {
                x |= (regs[*r as usize] & ((1u64 << bits) - 1)) << (bits as usize * i);
            }
            regs[d as usize] = x;
        }
        &Op::Unpack { bits, n, d, a } => {
            let x = v(a);
            for (i, r) in d.iter().enumerate().take(n as usize) {
                regs[*r as usize] = (x >> (bits as usize * i)) & ((1u64 << bits) - 1);
            }
        }
        &Op::Half { conv, d, a, b } => {
            let (x, y) = (v(a), v(b));
            regs[d as usize] = match conv {
                HalfConv::F32ToF16 => half::f32_to_f16_rn(f32v(x)) as u64,
                HalfConv::F32ToBf16 => half::f32_to_bf16_rn(f32v(x)) as u64,
                HalfConv::F16ToF32 => half::f16_to_f32(x as u16).to_bits() as u64,
                HalfConv::Bf16ToF32 => half::bf16_to_f32(x as u16).to_bits() as u64,
                HalfConv::F32x2ToF16x2 => {
                    ((half::f32_to_f16_rn(f32v(x)) as u64) << 16) | half::f32_to_f16_rn(f32v(y)) as u64
                }
                HalfConv::F32x2ToBf16x2 => {
                    ((half::f32_to_bf16_rn(f32v(x)) as u64) << 16) | half::f32_to_bf16_rn(f32v(y)) as u64
                }
                HalfConv::F32ToTf32 { ties_away } => half::f32_to_tf32(f32v(x), ties_away) as u64,
            };
        }
        &Op::CpAsync { dst, src: s, size, src_size } => {
            let size = size as usize;
            let (da, sa) = (eff(&dst, regs), eff(&s, regs));
            let valid = match src_size {
                Some(n) => v(n) as usize,
                None => size,
            };
            if valid > size {
                return Err(format!("cp.async src-size {valid} exceeds cp-size {size}"));
            }
            let mut data = [0u8; 16];
            if valid > 0 {
                // With src-size 0 nothing is read (a pure zero fill).
                check_align(sa, size, "cp.async source", cta, t)?;
                let from = memory.bytes(sa, valid).ok_or_else(|| {
                    format!(
                        "out-of-bounds cp.async source of {valid} bytes at {sa:#x} by {} (outside every buffer)",
                        cta.who(t)
                    )
                })?;
                data[..valid].copy_from_slice(from);
            }
            let o = cta.sh.range(t, da, size, "cp.async destination")?;
            cta.sh.begin_async(t, o, size, ins.line)?;
            cta.asyncq[t as usize].issue(Copy::new(o, data, size));
        }
        Op::CpCommit => cta.asyncq[t as usize].commit(),
        &Op::CpWait { n, all } => {
            for c in cta.asyncq[t as usize].wait(n, all) {
                cta.sh.end_async(t, c.dst, c.bytes())?;
            }
        }
        Op::Shfl { .. } | Op::Mma(_) | Op::Ldmatrix { .. } | Op::WarpSync { .. } => {
            unreachable!("collectives run in `collective`")
        }
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
                Ty::S16 => f as i16 as u16 as u64,
                Ty::U16 | Ty::B16 => f as u16 as u64,
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
    let (space, a) = resolve(space, a, cta.sh.len());
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
            let o = cta.sh.range(t, a, n, "load")?;
            cta.sh.read(t, o, out)?;
        }
    }
    Ok(())
}

fn store(cta: &mut Cta, t: u32, space: Space, a: u64, x: &[u8], mem: &mut GlobalMemory) -> Result<(), String> {
    let n = x.len();
    let (space, a) = resolve(space, a, cta.sh.len());
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
            let o = cta.sh.range(t, a, n, "store")?;
            cta.sh.write(t, o, x)
        }
    }
}
