//! Decoding of the tensor-core era instructions: `mma.sync`, `ldmatrix`, `shfl.sync`,
//! `bar.warp.sync`, `cp.async.*`, vector `ld`/`st`, `mov` packing and the narrow-float `cvt`s.
//! Every form not listed in the module documentation is an error naming the line.

use super::parse::{Addr, Ctx, HalfConv, Mma, MmaKind, Op, ROp, RawInstr, ShflMode, Space, Src, StV, Ty};
use super::SimError;

/// The instructions of this module, or `None` to let the scalar decoder try.
pub(super) fn decode_tc(c: &Ctx, ri: &RawInstr, base: &str, mods: &[&str]) -> Option<Result<Op, SimError>> {
    Some(match base {
        "mma" => mma(c, ri, mods),
        "ldmatrix" => ldmatrix(c, ri, mods),
        "shfl" => shfl(c, ri, mods),
        "cp" => cp_async(c, ri, mods),
        "bar" if mods.first() == Some(&"warp") => {
            if mods != ["warp", "sync"] {
                return Some(Err(c.err("expected `bar.warp.sync membermask`")));
            }
            operands(c, ri, 1).and_then(|_| Ok(Op::WarpSync { mask: c.src(&ri.ops[0], Ty::B32)? }))
        }
        _ => return None,
    })
}

fn operands(c: &Ctx, ri: &RawInstr, n: usize) -> Result<(), SimError> {
    if ri.ops.len() == n {
        Ok(())
    } else {
        Err(c.err(format!("expects {n} operands, found {}", ri.ops.len())))
    }
}

/// Checks that register operand `o` is declared with `bits` bits (as ptxas does).
fn reg_bits(c: &Ctx, o: &ROp, bits: u32) -> Result<(), SimError> {
    if let Ok(r) = c.reg(o) {
        let have = c.reg_tys[r as usize].bits();
        if have != bits {
            return Err(c.err(format!("operand {o:?} is a {have}-bit register, {bits} bits expected")));
        }
    }
    Ok(())
}

fn vec_of(c: &Ctx, o: &ROp, n: usize, bits: u32) -> Result<[u32; 4], SimError> {
    let r = c.regs(o, n)?;
    if let ROp::Vec(v) = o {
        for e in v {
            reg_bits(c, e, bits)?;
        }
    }
    Ok(r)
}

fn mma(c: &Ctx, ri: &RawInstr, mods: &[&str]) -> Result<Op, SimError> {
    let kind = match mods {
        ["sync", "aligned", "m16n8k16", "row", "col", "f32", "bf16", "bf16", "f32"] => MmaKind::Bf16,
        ["sync", "aligned", "m16n8k16", "row", "col", "f32", "f16", "f16", "f32"] => MmaKind::F16,
        ["sync", "aligned", "m16n8k8", "row", "col", "f32", "tf32", "tf32", "f32"] => MmaKind::Tf32,
        _ => {
            return Err(c.err(
                "unsupported mma form (supported: mma.sync.aligned.m16n8k16.row.col.f32.{bf16.bf16,f16.f16}.f32 \
                 and mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32)",
            ))
        }
    };
    operands(c, ri, 4)?;
    let o = &ri.ops;
    let d = vec_of(c, &o[0], 4, 32)?;
    let a = vec_of(c, &o[1], 4, 32)?;
    let b2 = vec_of(c, &o[2], 2, 32)?;
    let ROp::Vec(cv) = &o[3] else { return Err(c.err("expected a vector of 4 accumulators")) };
    if cv.len() != 4 {
        return Err(c.err(format!("expected 4 accumulators, found {}", cv.len())));
    }
    let mut cs = [Src::Imm(0); 4];
    for (slot, e) in cs.iter_mut().zip(cv) {
        reg_bits(c, e, 32)?;
        *slot = c.src(e, Ty::F32)?;
    }
    Ok(Op::Mma(Box::new(Mma { kind, d, a, b: [b2[0], b2[1]], c: cs })))
}

fn ldmatrix(c: &Ctx, ri: &RawInstr, mods: &[&str]) -> Result<Op, SimError> {
    let mut num = 0u8;
    let mut trans = false;
    let mut space = Space::Generic;
    let mut seen = (false, false, false, false);
    for m in mods {
        match *m {
            "sync" => seen.0 = true,
            "aligned" => seen.1 = true,
            "m8n8" => seen.2 = true,
            "b16" => seen.3 = true,
            "x1" => num = 1,
            "x2" => num = 2,
            "x4" => num = 4,
            "trans" => trans = true,
            "shared" => space = Space::Shared,
            other => return Err(c.err(format!("unsupported ldmatrix modifier `.{other}` (only .m8n8 .b16)"))),
        }
    }
    if seen != (true, true, true, true) || num == 0 {
        return Err(c.err("expected ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{.trans}{.shared}.b16"));
    }
    operands(c, ri, 2)?;
    let d = vec_of(c, &ri.ops[0], num as usize, 32)?;
    let addr = c.addr(&ri.ops[1], space)?;
    Ok(Op::Ldmatrix { num, trans, d, addr, space })
}

fn shfl(c: &Ctx, ri: &RawInstr, mods: &[&str]) -> Result<Op, SimError> {
    let mode = match mods {
        ["sync", "up", "b32"] => ShflMode::Up,
        ["sync", "down", "b32"] => ShflMode::Down,
        ["sync", "bfly", "b32"] => ShflMode::Bfly,
        ["sync", "idx", "b32"] => ShflMode::Idx,
        _ => return Err(c.err("expected shfl.sync.{up,down,bfly,idx}.b32")),
    };
    operands(c, ri, 5)?;
    let o = &ri.ops;
    let (d, p) = match &o[0] {
        ROp::Pipe(d, p) => (c.reg(d)?, Some(c.reg(p)?)),
        d => (c.reg(d)?, None),
    };
    if let Some(p) = p {
        if c.reg_tys[p as usize] != Ty::Pred {
            return Err(c.err("the second destination of shfl must be a predicate"));
        }
    }
    Ok(Op::Shfl {
        mode,
        d,
        p,
        a: c.src(&o[1], Ty::B32)?,
        b: c.src(&o[2], Ty::B32)?,
        c: c.src(&o[3], Ty::B32)?,
        mask: c.src(&o[4], Ty::B32)?,
    })
}

fn cp_async(c: &Ctx, ri: &RawInstr, mods: &[&str]) -> Result<Op, SimError> {
    let o = &ri.ops;
    match mods {
        ["async", "commit_group"] => {
            operands(c, ri, 0)?;
            return Ok(Op::CpCommit);
        }
        ["async", "wait_all"] => {
            operands(c, ri, 0)?;
            return Ok(Op::CpWait { n: 0, all: true });
        }
        ["async", "wait_group"] => {
            operands(c, ri, 1)?;
            let ROp::Int(n) = o[0] else { return Err(c.err("wait_group takes an integer constant")) };
            let n = u32::try_from(n).map_err(|_| c.err("negative wait_group count"))?;
            return Ok(Op::CpWait { n, all: false });
        }
        _ => {}
    }
    let rest: Vec<&str> = mods.iter().copied().filter(|m| !m.starts_with("L2::")).collect();
    let cg = match rest.as_slice() {
        ["async", "ca", "shared", "global"] => false,
        ["async", "cg", "shared", "global"] => true,
        _ => return Err(c.err("expected cp.async.{ca,cg}.shared{::cta}.global, commit_group, wait_group or wait_all")),
    };
    if o.len() != 3 && o.len() != 4 {
        return Err(c.err(format!("expects 3 or 4 operands, found {}", o.len())));
    }
    let dst: Addr = c.addr(&o[0], Space::Shared)?;
    let src: Addr = c.addr(&o[1], Space::Global)?;
    let size = match o[2] {
        ROp::Int(n @ (4 | 8 | 16)) => n as u8,
        _ => return Err(c.err("cp-size must be 4, 8 or 16")),
    };
    if cg && size != 16 {
        return Err(c.err("cp.async.cg copies 16 bytes"));
    }
    let src_size = match o.get(3) {
        Some(s) => Some(c.src(s, Ty::U32)?),
        None => None,
    };
    Ok(Op::CpAsync { dst, src, size, src_size })
}

/// `mov.bN d, {a, b..}` and `mov.bN {d0, d1..}, a`.
pub(super) fn pack(c: &Ctx, ty: Ty, o0: &ROp, o1: &ROp) -> Result<Op, SimError> {
    if !matches!(ty, Ty::B32 | Ty::B64) {
        return Err(c.err("packing moves are mov.b32 or mov.b64"));
    }
    let (vec, other) = match (o0, o1) {
        (ROp::Vec(v), x) | (x, ROp::Vec(v)) if !matches!(x, ROp::Vec(_)) => (v, x),
        _ => return Err(c.err("expected one vector operand")),
    };
    let n = vec.len();
    if n != 2 && n != 4 || ty.bits() / n as u32 == 8 {
        return Err(c.err(format!("cannot split .{ty:?} into {n} parts")));
    }
    let bits = ty.bits() / n as u32;
    let parts = vec_of(c, if matches!(o0, ROp::Vec(_)) { o0 } else { o1 }, n, bits)?;
    if matches!(o0, ROp::Vec(_)) {
        Ok(Op::Unpack { bits, n: n as u8, d: parts, a: c.src(other, ty)? })
    } else {
        reg_bits(c, other, ty.bits())?;
        Ok(Op::Pack { bits, n: n as u8, d: c.reg(other)?, a: parts })
    }
}

/// The `cvt`s to and from `.f16`, `.bf16`, `.f16x2`, `.bf16x2` and `.tf32`.
pub(super) fn cvt_narrow(c: &Ctx, ri: &RawInstr, mods: &[&str], types: &[Ty]) -> Result<Op, SimError> {
    for m in mods {
        if matches!(*m, "ftz" | "relu" | "satfinite" | "rs") {
            return Err(c.err(format!("`.{m}` is not supported on narrow-float cvt")));
        }
    }
    let rn = mods.contains(&"rn");
    let rna = mods.contains(&"rna");
    let o = &ri.ops;
    let (conv, dbits, sbits, nsrc) = match (types, rn, rna) {
        ([Ty::F16, Ty::F32], true, false) => (HalfConv::F32ToF16, 16, 32, 1),
        ([Ty::BF16, Ty::F32], true, false) => (HalfConv::F32ToBf16, 16, 32, 1),
        ([Ty::F32, Ty::F16], false, false) => (HalfConv::F16ToF32, 32, 16, 1),
        // ptxas accepts (and ignores) `.rn` on the bf16 widening, not on the f16 one.
        ([Ty::F32, Ty::BF16], _, false) => (HalfConv::Bf16ToF32, 32, 16, 1),
        ([Ty::F16x2, Ty::F32], true, false) => (HalfConv::F32x2ToF16x2, 32, 32, 2),
        ([Ty::BF16x2, Ty::F32], true, false) => (HalfConv::F32x2ToBf16x2, 32, 32, 2),
        ([Ty::Tf32, Ty::F32], false, true) => (HalfConv::F32ToTf32 { ties_away: true }, 32, 32, 1),
        ([Ty::Tf32, Ty::F32], true, false) => (HalfConv::F32ToTf32 { ties_away: false }, 32, 32, 1),
        _ => {
            return Err(c.err(
                "unsupported narrow-float cvt (supported: cvt.rn.{f16,bf16}.f32, cvt.f32.{f16,bf16}, \
                 cvt.rn.{f16x2,bf16x2}.f32, cvt.{rna,rn}.tf32.f32)",
            ))
        }
    };
    operands(c, ri, 1 + nsrc)?;
    reg_bits(c, &o[0], dbits)?;
    for s in &o[1..] {
        reg_bits(c, s, sbits)?;
    }
    let sty = if sbits == 16 { Ty::B16 } else { Ty::F32 };
    let a = c.src(&o[1], sty)?;
    let b = if nsrc == 2 { c.src(&o[2], sty)? } else { Src::Imm(0) };
    Ok(Op::Half { conv, d: c.reg(&o[0])?, a, b })
}

/// `ld.vN` / `st.vN`.
pub(super) fn ld_st_vector(c: &Ctx, ld: bool, sp: Space, ty: Ty, n: u8, o0: &ROp, o1: &ROp) -> Result<Op, SimError> {
    if sp == Space::Param && !ld {
        return Err(c.err("st.param is not supported"));
    }
    if ld {
        let d = vec_of(c, o0, n as usize, ty.bits().max(16))?;
        return Ok(Op::LdV { space: sp, ty, n, d, addr: c.addr(o1, sp)? });
    }
    let ROp::Vec(v) = o1 else { return Err(c.err(format!("expected a vector of {n} values"))) };
    if v.len() != n as usize {
        return Err(c.err(format!("expected a vector of {n} values, found {}", v.len())));
    }
    let mut a = [Src::Imm(0); 4];
    for (slot, e) in a.iter_mut().zip(v) {
        reg_bits(c, e, ty.bits())?;
        *slot = c.src(e, ty)?;
    }
    Ok(Op::StV(Box::new(StV { space: sp, ty, n, addr: c.addr(o0, sp)?, a })))
}
