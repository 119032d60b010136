//! Tokenizer, parser and decoder of the PTX subset: the text becomes a [`Module`] of entries
//! whose bodies are decoded [`Instr`]s with registers, labels and symbols resolved.

use super::SimError;
use std::collections::HashMap;

/// A parsed PTX module.
#[derive(Clone, Debug)]
pub struct Module {
    pub entries: Vec<Entry>,
}

/// One `.entry`.
#[derive(Clone, Debug)]
pub struct Entry {
    pub name: String,
    pub line: usize,
    pub params: Vec<ParamDecl>,
    /// Size of the parameter space (bytes).
    pub param_bytes: usize,
    pub nregs: usize,
    pub instrs: Vec<Instr>,
    /// Static shared bytes; the dynamic part starts at [`Entry::dynamic_base`].
    pub static_shared: usize,
    pub dynamic_base: usize,
}

#[derive(Clone, Debug)]
pub struct ParamDecl {
    pub name: String,
    pub ty: Ty,
    pub offset: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ty {
    B16,
    U16,
    S16,
    /// `.f16` / `.bf16`: 16-bit storage only (mov, ld, st, cvt and mma operands).
    F16,
    BF16,
    /// Two halves in 32 bits (`.f16x2`, `.bf16x2`), and `.tf32` in its 32-bit container.
    F16x2,
    BF16x2,
    Tf32,
    B32,
    U32,
    S32,
    B64,
    U64,
    S64,
    F32,
    F64,
    Pred,
}

impl Ty {
    pub fn bytes(self) -> usize {
        match self {
            Ty::B16 | Ty::U16 | Ty::S16 | Ty::F16 | Ty::BF16 => 2,
            Ty::F16x2 | Ty::BF16x2 | Ty::Tf32 => 4,
            Ty::B32 | Ty::U32 | Ty::S32 | Ty::F32 => 4,
            Ty::B64 | Ty::U64 | Ty::S64 | Ty::F64 => 8,
            Ty::Pred => 1,
        }
    }
    pub fn bits(self) -> u32 {
        self.bytes() as u32 * 8
    }
    /// f32 or f64 (the types of the scalar float arithmetic; the narrow formats are not).
    pub fn is_float(self) -> bool {
        matches!(self, Ty::F32 | Ty::F64)
    }
    /// The narrow float formats, which only move, convert and feed mma.
    pub fn is_narrow_float(self) -> bool {
        matches!(self, Ty::F16 | Ty::BF16 | Ty::F16x2 | Ty::BF16x2 | Ty::Tf32)
    }
    pub fn is_signed(self) -> bool {
        matches!(self, Ty::S16 | Ty::S32 | Ty::S64)
    }
    pub(super) fn parse(s: &str) -> Option<Ty> {
        Some(match s {
            "b16" => Ty::B16,
            "u16" => Ty::U16,
            "s16" => Ty::S16,
            "f16" => Ty::F16,
            "bf16" => Ty::BF16,
            "f16x2" => Ty::F16x2,
            "bf16x2" => Ty::BF16x2,
            "tf32" => Ty::Tf32,
            "b32" => Ty::B32,
            "u32" => Ty::U32,
            "s32" => Ty::S32,
            "b64" => Ty::B64,
            "u64" => Ty::U64,
            "s64" => Ty::S64,
            "f32" => Ty::F32,
            "f64" => Ty::F64,
            "pred" => Ty::Pred,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Special {
    Tid(usize),
    Ntid(usize),
    Ctaid(usize),
    Nctaid(usize),
    LaneId,
    WarpId,
}

/// A source operand: a register, an immediate (already in the bits of the operand's type) or
/// a special register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Src {
    Reg(u32),
    Imm(u64),
    Special(Special),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Space {
    Global,
    Shared,
    Param,
    Generic,
}

/// `[base + off]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Addr {
    pub base: Option<u32>,
    pub off: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rnd {
    None,
    Rn,
    Rni,
    Rzi,
    Rmi,
    Rpi,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    MulLo,
    MulHi,
    MulWide,
    Div,
    Rem,
    Min,
    Max,
    MinNaN,
    MaxNaN,
    Shl,
    Shr,
    And,
    Or,
    Xor,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnOp {
    Neg,
    Abs,
    Not,
    Ex2,
    Lg2,
    Rcp,
    Sqrt,
    Rsqrt,
    Sin,
    Cos,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MadMode {
    Lo,
    Hi,
    Wide,
    Fma,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Lo,
    Ls,
    Hi,
    Hs,
    Equ,
    Neu,
    Ltu,
    Leu,
    Gtu,
    Geu,
    Num,
    Nan,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BoolOp {
    And,
    Or,
    Xor,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    Mov {
        ty: Ty,
        d: u32,
        a: Src,
    },
    Cvt {
        dty: Ty,
        sty: Ty,
        rnd: Rnd,
        ftz: bool,
        d: u32,
        a: Src,
    },
    Cvta {
        to: bool,
        space: Space,
        ty: Ty,
        d: u32,
        a: Src,
    },
    Ld {
        space: Space,
        ty: Ty,
        d: u32,
        addr: Addr,
    },
    St {
        space: Space,
        ty: Ty,
        addr: Addr,
        a: Src,
    },
    Bin {
        op: BinOp,
        ty: Ty,
        ftz: bool,
        d: u32,
        a: Src,
        b: Src,
    },
    Mad {
        mode: MadMode,
        ty: Ty,
        ftz: bool,
        d: u32,
        a: Src,
        b: Src,
        c: Src,
    },
    Un {
        op: UnOp,
        ty: Ty,
        ftz: bool,
        d: u32,
        a: Src,
    },
    Setp {
        cmp: Cmp,
        ty: Ty,
        ftz: bool,
        p: u32,
        a: Src,
        b: Src,
        combine: Option<(BoolOp, Src)>,
    },
    Selp {
        ty: Ty,
        d: u32,
        a: Src,
        b: Src,
        p: Src,
    },
    Bra {
        target: usize,
        uni: bool,
    },
    Exit,
    Bar {
        id: Src,
    },
    /// `ld.s16` into a wider register of `bits` bits: sign-extended.
    LdSext {
        space: Space,
        d: u32,
        addr: Addr,
        bits: u32,
    },
    /// `ld.v2/.v4`: one access of `n` elements into `d[..n]`.
    LdV {
        space: Space,
        ty: Ty,
        n: u8,
        d: [u32; 4],
        addr: Addr,
    },
    StV(Box<StV>),
    /// `mov.bN d, {a0, a1, ..}`: `n` parts of N/n bits, `a0` in the low bits.
    Pack {
        bits: u32,
        n: u8,
        d: u32,
        a: [u32; 4],
    },
    /// `mov.bN {d0, d1, ..}, a`: the inverse of `Pack`.
    Unpack {
        bits: u32,
        n: u8,
        d: [u32; 4],
        a: Src,
    },
    /// Conversions to and from the narrow float formats (`b` is the second source of the
    /// packing forms).
    Half {
        conv: HalfConv,
        d: u32,
        a: Src,
        b: Src,
    },
    /// Warp-collective (see [`Op::is_collective`]).
    Shfl {
        mode: ShflMode,
        d: u32,
        p: Option<u32>,
        a: Src,
        b: Src,
        c: Src,
        mask: Src,
    },
    Mma(Box<Mma>),
    Ldmatrix {
        num: u8,
        trans: bool,
        d: [u32; 4],
        addr: Addr,
        space: Space,
    },
    WarpSync {
        mask: Src,
    },
    /// `cp.async.{ca,cg}.shared.global [dst], [src], size{, src_size}`.
    CpAsync {
        dst: Addr,
        src: Addr,
        size: u8,
        src_size: Option<Src>,
    },
    CpCommit,
    /// `cp.async.wait_group n`; `all` for `cp.async.wait_all` (which also covers copies
    /// not yet committed).
    CpWait {
        n: u32,
        all: bool,
    },
}

impl Op {
    /// Instructions that all lanes of a warp (or of the membermask) execute together.
    pub fn is_collective(&self) -> bool {
        matches!(self, Op::Shfl { .. } | Op::Mma(_) | Op::Ldmatrix { .. } | Op::WarpSync { .. })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct StV {
    pub space: Space,
    pub ty: Ty,
    pub n: u8,
    pub addr: Addr,
    pub a: [Src; 4],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HalfConv {
    F32ToF16,
    F32ToBf16,
    F16ToF32,
    Bf16ToF32,
    /// `cvt.rn.f16x2.f32 d, a, b`: `a` to the upper half, `b` to the lower.
    F32x2ToF16x2,
    F32x2ToBf16x2,
    F32ToTf32 {
        ties_away: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShflMode {
    Up,
    Down,
    Bfly,
    Idx,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmaKind {
    /// m16n8k16, bf16 inputs, f32 accumulators.
    Bf16,
    /// m16n8k16, f16 inputs, f32 accumulators.
    F16,
    /// m16n8k8, tf32 inputs, f32 accumulators.
    Tf32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Mma {
    pub kind: MmaKind,
    pub d: [u32; 4],
    pub a: [u32; 4],
    pub b: [u32; 2],
    pub c: [Src; 4],
}

#[derive(Clone, Debug, PartialEq)]
pub struct Instr {
    pub line: usize,
    /// `@p` (false) or `@!p` (true).
    pub guard: Option<(u32, bool)>,
    pub op: Op,
}

// ---------------------------------------------------------------------------------------
// Tokens

#[derive(Clone, Debug)]
struct Tok {
    text: String,
    line: usize,
}

fn is_word(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '%' | '$')
}

fn tokenize(src: &str) -> Result<Vec<Tok>, SimError> {
    let mut out = vec![];
    let chars: Vec<char> = src.chars().collect();
    let mut i = 0;
    let mut line = 1;
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c == '/' && chars.get(i + 1) == Some(&'/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && chars.get(i + 1) == Some(&'*') {
            i += 2;
            while i < chars.len() && !(chars[i] == '*' && chars.get(i + 1) == Some(&'/')) {
                if chars[i] == '\n' {
                    line += 1;
                }
                i += 1;
            }
            i += 2;
        } else if is_word(c) {
            let s = i;
            // `::` belongs to the word (`.shared::cta`); a single `:` ends a label.
            while i < chars.len() && (is_word(chars[i]) || (chars[i] == ':' && chars.get(i + 1) == Some(&':') && i > s))
            {
                i += if chars[i] == ':' { 2 } else { 1 };
            }
            out.push(Tok { text: chars[s..i].iter().collect(), line });
        } else if "(),;:[]{}<>@!+-|=".contains(c) {
            out.push(Tok { text: c.to_string(), line });
            i += 1;
        } else {
            return Err(SimError::new(line, format!("unexpected character `{c}`")));
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Raw statements

#[derive(Clone, Debug)]
pub(super) enum ROp {
    Word(String),
    Int(i64),
    F32(u32),
    F64(u64),
    Mem {
        base: Option<String>,
        off: i64,
    },
    /// `{a, b, ...}`
    Vec(Vec<ROp>),
    /// `d|p` (shfl's value and predicate destinations)
    Pipe(Box<ROp>, Box<ROp>),
}

#[derive(Clone, Debug)]
pub(super) struct RawInstr {
    pub(super) line: usize,
    guard: Option<(String, bool)>,
    pub(super) opcode: String,
    pub(super) ops: Vec<ROp>,
}

#[derive(Clone, Debug)]
struct SharedDecl {
    name: String,
    align: usize,
    bytes: Option<usize>,
}

struct Parser {
    toks: Vec<Tok>,
    i: usize,
}

impl Parser {
    fn peek(&self) -> Option<&str> {
        self.toks.get(self.i).map(|t| t.text.as_str())
    }
    fn line(&self) -> usize {
        self.toks.get(self.i).or(self.toks.last()).map_or(0, |t| t.line)
    }
    fn next(&mut self) -> Result<Tok, SimError> {
        let t = self.toks.get(self.i).cloned().ok_or_else(|| SimError::new(self.line(), "unexpected end of PTX"))?;
        self.i += 1;
        Ok(t)
    }
    fn expect(&mut self, s: &str) -> Result<Tok, SimError> {
        let t = self.next()?;
        if t.text != s {
            return Err(SimError::new(t.line, format!("expected `{s}`, found `{}`", t.text)));
        }
        Ok(t)
    }
    fn eat(&mut self, s: &str) -> bool {
        if self.peek() == Some(s) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn skip_line(&mut self, line: usize) {
        while self.toks.get(self.i).is_some_and(|t| t.line == line) {
            self.i += 1;
        }
    }
    fn number(&mut self) -> Result<i64, SimError> {
        let neg = self.eat("-");
        let t = self.next()?;
        let v = parse_int(&t.text)
            .ok_or_else(|| SimError::new(t.line, format!("expected a number, found `{}`", t.text)))?;
        Ok(if neg { v.wrapping_neg() } else { v })
    }

    /// `.shared [.align N] .bX name[N]? ;` (after `.shared`).
    fn shared_decl(&mut self) -> Result<SharedDecl, SimError> {
        let mut align = 1;
        let mut elem = 1;
        loop {
            let t = self.next()?;
            match t.text.as_str() {
                ".align" => align = self.number()?.max(1) as usize,
                s if s.starts_with('.') => {
                    let ty = &s[1..];
                    elem = match ty {
                        "b8" | "u8" | "s8" => 1,
                        "b16" | "u16" | "s16" | "f16" => 2,
                        _ => Ty::parse(ty)
                            .filter(|t| *t != Ty::Pred)
                            .ok_or_else(|| SimError::new(t.line, format!("unsupported shared type `{s}`")))?
                            .bytes(),
                    };
                    align = align.max(elem);
                }
                name => {
                    let name = name.to_string();
                    let mut bytes = Some(elem);
                    while self.eat("[") {
                        if self.eat("]") {
                            bytes = None;
                        } else {
                            let n = self.number()?;
                            self.expect("]")?;
                            bytes = bytes.map(|b| b.saturating_mul(n.max(0) as usize));
                        }
                    }
                    if self.peek() == Some("=") {
                        return Err(SimError::new(t.line, "initialised .shared variables are not supported"));
                    }
                    self.expect(";")?;
                    return Ok(SharedDecl { name, align, bytes });
                }
            }
        }
    }

    fn operand(&mut self) -> Result<ROp, SimError> {
        let line = self.line();
        if self.eat("[") {
            let mut base = None;
            let mut off = 0i64;
            if self.peek() == Some("-") || self.peek().is_some_and(|s| s.starts_with(|c: char| c.is_ascii_digit())) {
                off = self.number()?;
            } else {
                base = Some(self.next()?.text);
                if self.eat("+") || self.peek() == Some("-") {
                    off = self.number()?;
                }
            }
            self.expect("]")?;
            return Ok(ROp::Mem { base, off });
        }
        if self.eat("{") {
            let mut elems = vec![];
            loop {
                elems.push(self.operand()?);
                if self.eat("}") {
                    break;
                }
                self.expect(",")?;
            }
            if elems.iter().any(|e| matches!(e, ROp::Vec(_) | ROp::Mem { .. })) {
                return Err(SimError::new(line, "nested or memory operand inside `{...}`"));
            }
            return Ok(ROp::Vec(elems));
        }
        if self.peek() == Some("-") {
            self.i += 1;
            let t = self.next()?;
            return match parse_num(&t.text) {
                Some(ROp::Int(v)) => Ok(ROp::Int(v.wrapping_neg())),
                Some(ROp::F32(b)) => Ok(ROp::F32(b ^ 0x8000_0000)),
                Some(ROp::F64(b)) => Ok(ROp::F64(b ^ (1 << 63))),
                _ => Err(SimError::new(line, format!("bad operand `-{}`", t.text))),
            };
        }
        let t = self.next()?;
        if let Some(n) = parse_num(&t.text) {
            return Ok(n);
        }
        if !t.text.starts_with(|c: char| c.is_ascii_alphabetic() || matches!(c, '%' | '$' | '_')) {
            return Err(SimError::new(line, format!("bad operand `{}`", t.text)));
        }
        Ok(ROp::Word(t.text))
    }
}

fn parse_int(s: &str) -> Option<i64> {
    let s = s.strip_suffix('U').unwrap_or(s);
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok().map(|v| v as i64)
    } else if s.len() > 1 && s.starts_with('0') && s.chars().all(|c| c.is_ascii_digit()) {
        u64::from_str_radix(&s[1..], 8).ok().map(|v| v as i64)
    } else if !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()) {
        s.parse::<u64>().ok().map(|v| v as i64)
    } else {
        None
    }
}

fn parse_num(s: &str) -> Option<ROp> {
    if let Some(h) = s.strip_prefix("0f").or_else(|| s.strip_prefix("0F")) {
        if h.len() == 8 {
            return u32::from_str_radix(h, 16).ok().map(ROp::F32);
        }
    }
    if let Some(h) = s.strip_prefix("0d").or_else(|| s.strip_prefix("0D")) {
        if h.len() == 16 {
            return u64::from_str_radix(h, 16).ok().map(ROp::F64);
        }
    }
    if let Some(v) = parse_int(s) {
        return Some(ROp::Int(v));
    }
    if s.starts_with(|c: char| c.is_ascii_digit()) && s.contains('.') {
        return s.parse::<f64>().ok().map(|v| ROp::F64(v.to_bits()));
    }
    None
}

struct RawEntry {
    name: String,
    line: usize,
    params: Vec<ParamDecl>,
    param_bytes: usize,
    regs: Vec<(String, Option<usize>, Ty)>,
    shared: Vec<SharedDecl>,
    labels: HashMap<String, usize>,
    body: Vec<RawInstr>,
}

/// Parses and decodes a PTX module.
pub fn parse_module(src: &str) -> Result<Module, SimError> {
    let mut p = Parser { toks: tokenize(src)?, i: 0 };
    let mut module_shared = vec![];
    let mut raws = vec![];
    while let Some(t) = p.peek() {
        let line = p.line();
        match t {
            ".version" | ".target" | ".address_size" => p.skip_line(line),
            ".visible" | ".weak" | ".extern" => p.i += 1,
            ".shared" => {
                p.i += 1;
                module_shared.push(p.shared_decl()?);
            }
            ".entry" => {
                p.i += 1;
                raws.push(parse_entry(&mut p, line)?);
            }
            other => return Err(SimError::new(line, format!("unsupported module-level `{other}`"))),
        }
    }
    let mut entries = vec![];
    for raw in raws {
        entries.push(decode_entry(raw, &module_shared)?);
    }
    Ok(Module { entries })
}

fn parse_entry(p: &mut Parser, line: usize) -> Result<RawEntry, SimError> {
    let name = p.next()?.text;
    let mut params = vec![];
    let mut param_bytes = 0usize;
    p.expect("(")?;
    if !p.eat(")") {
        loop {
            p.expect(".param")?;
            let tt = p.next()?;
            let ty = tt
                .text
                .strip_prefix('.')
                .and_then(Ty::parse)
                .filter(|t| *t != Ty::Pred)
                .ok_or_else(|| SimError::new(tt.line, format!("unsupported parameter type `{}`", tt.text)))?;
            if p.peek() == Some(".align") {
                return Err(SimError::new(tt.line, "array parameters are not supported"));
            }
            let pname = p.next()?.text;
            let size = ty.bytes();
            param_bytes = param_bytes.div_ceil(size) * size;
            params.push(ParamDecl { name: pname, ty, offset: param_bytes });
            param_bytes += size;
            if p.eat(")") {
                break;
            }
            p.expect(",")?;
        }
    }
    while p.peek().is_some_and(|t| t != "{") {
        p.i += 1; // .maxntid / .reqntid / .minnctapersm / .maxnreg and their arguments
    }
    p.expect("{")?;
    let mut e = RawEntry {
        name,
        line,
        params,
        param_bytes,
        regs: vec![],
        shared: vec![],
        labels: HashMap::new(),
        body: vec![],
    };
    let mut depth = 1;
    while depth > 0 {
        let t = p.next()?;
        let line = t.line;
        match t.text.as_str() {
            "{" => depth += 1,
            "}" => depth -= 1,
            ".reg" => {
                let tt = p.next()?;
                let rty = tt
                    .text
                    .strip_prefix('.')
                    .and_then(Ty::parse)
                    .ok_or_else(|| SimError::new(line, format!("unsupported register type `{}`", tt.text)))?;
                loop {
                    let n = p.next()?.text;
                    let count = if p.eat("<") {
                        let c = p.number()?;
                        p.expect(">")?;
                        Some(c.max(0) as usize)
                    } else {
                        None
                    };
                    e.regs.push((n, count, rty));
                    if p.eat(";") {
                        break;
                    }
                    p.expect(",")?;
                }
            }
            ".shared" => e.shared.push(p.shared_decl()?),
            ".pragma" => while p.next()?.text != ";" {},
            ";" => {}
            "@" => {
                let neg = p.eat("!");
                let pred = p.next()?.text;
                let mut ins = parse_instr(p)?;
                ins.guard = Some((pred, neg));
                e.body.push(ins);
            }
            w if p.peek() == Some(":") => {
                p.i += 1;
                if e.labels.insert(w.to_string(), e.body.len()).is_some() {
                    return Err(SimError::new(line, format!("label `{w}` defined twice")));
                }
            }
            w if w.starts_with('.') => return Err(SimError::new(line, format!("unsupported directive `{w}`"))),
            _ => {
                p.i -= 1;
                e.body.push(parse_instr(p)?);
            }
        }
    }
    Ok(e)
}

fn parse_instr(p: &mut Parser) -> Result<RawInstr, SimError> {
    let t = p.next()?;
    let mut ops = vec![];
    if !p.eat(";") {
        loop {
            let first = p.operand()?;
            if p.eat("|") {
                let second = p.operand()?;
                ops.push(ROp::Pipe(Box::new(first), Box::new(second)));
            } else {
                ops.push(first);
            }
            if p.eat(";") {
                break;
            }
            let line = p.line();
            let sep = p.next()?;
            if sep.text != "," {
                return Err(SimError::new(line, format!("unexpected `{}` in `{}`", sep.text, t.text)));
            }
        }
    }
    Ok(RawInstr { line: t.line, guard: None, opcode: t.text, ops })
}

// ---------------------------------------------------------------------------------------
// Decoding

pub(super) struct Ctx<'a> {
    regs: HashMap<String, u32>,
    /// The declared type of each register, by index.
    pub(super) reg_tys: Vec<Ty>,
    labels: &'a HashMap<String, usize>,
    shared: HashMap<String, usize>,
    params: &'a [ParamDecl],
    line: usize,
    opcode: &'a str,
}

impl Ctx<'_> {
    pub(super) fn err(&self, msg: impl std::fmt::Display) -> SimError {
        SimError::new(self.line, format!("`{}`: {msg}", self.opcode))
    }
    pub(super) fn reg(&self, o: &ROp) -> Result<u32, SimError> {
        match o {
            ROp::Word(w) => self.regs.get(w).copied().ok_or_else(|| self.err(format!("unknown register `{w}`"))),
            _ => Err(self.err("expected a register")),
        }
    }
    pub(super) fn src(&self, o: &ROp, ty: Ty) -> Result<Src, SimError> {
        let int_bits = |v: i64| match ty.bits() {
            16 => v as u64 & 0xFFFF,
            32 => v as u64 & 0xFFFF_FFFF,
            _ => v as u64,
        };
        Ok(match (o, ty) {
            (ROp::Word(w), _) => {
                if let Some(r) = self.regs.get(w) {
                    Src::Reg(*r)
                } else if let Some(s) = special(w) {
                    Src::Special(s)
                } else if let Some(off) = self.shared.get(w) {
                    Src::Imm(*off as u64)
                } else {
                    return Err(self.err(format!("unknown register or symbol `{w}`")));
                }
            }
            (ROp::Int(v), Ty::F32) => Src::Imm((*v as f32).to_bits() as u64),
            (ROp::Int(v), Ty::F64) => Src::Imm((*v as f64).to_bits()),
            (ROp::Int(v), Ty::Pred) => Src::Imm(u64::from(*v != 0)),
            (ROp::Int(v), _) => Src::Imm(int_bits(*v)),
            (ROp::F32(b), Ty::F32) => Src::Imm(*b as u64),
            (ROp::F32(b), Ty::F64) => Src::Imm((f32::from_bits(*b) as f64).to_bits()),
            (ROp::F64(b), Ty::F64) => Src::Imm(*b),
            (ROp::F64(b), Ty::F32) => Src::Imm((f64::from_bits(*b) as f32).to_bits() as u64),
            (ROp::F32(_) | ROp::F64(_), _) => return Err(self.err("float immediate for an integer operand")),
            (ROp::Mem { .. }, _) => return Err(self.err("unexpected memory operand")),
            (ROp::Vec(_) | ROp::Pipe(..), _) => return Err(self.err("unexpected vector or `|` operand")),
        })
    }
    /// The registers of a `{...}` operand with `n` elements.
    pub(super) fn regs(&self, o: &ROp, n: usize) -> Result<[u32; 4], SimError> {
        let ROp::Vec(v) = o else { return Err(self.err(format!("expected a vector of {n} registers `{{...}}`"))) };
        if v.len() != n || n > 4 {
            return Err(self.err(format!("expected a vector of {n} registers, found {}", v.len())));
        }
        let mut out = [0u32; 4];
        for (slot, e) in out.iter_mut().zip(v) {
            *slot = self.reg(e)?;
        }
        Ok(out)
    }
    pub(super) fn addr(&self, o: &ROp, space: Space) -> Result<Addr, SimError> {
        let ROp::Mem { base, off } = o else { return Err(self.err("expected a memory operand `[...]`")) };
        let Some(b) = base else { return Ok(Addr { base: None, off: *off }) };
        if let Some(r) = self.regs.get(b) {
            return Ok(Addr { base: Some(*r), off: *off });
        }
        if space == Space::Param {
            if let Some(pd) = self.params.iter().find(|p| &p.name == b) {
                return Ok(Addr { base: None, off: pd.offset as i64 + off });
            }
        }
        if let (Space::Shared, Some(o2)) = (space, self.shared.get(b)) {
            return Ok(Addr { base: None, off: *o2 as i64 + off });
        }
        Err(self.err(format!("unknown address `{b}`")))
    }
}

fn special(w: &str) -> Option<Special> {
    let dim = |s: &str| match s {
        "x" => Some(0),
        "y" => Some(1),
        "z" => Some(2),
        _ => None,
    };
    let (name, d) = w.split_once('.').map_or((w, None), |(a, b)| (a, dim(b)));
    Some(match (name, d) {
        ("%tid", Some(d)) => Special::Tid(d),
        ("%ntid", Some(d)) => Special::Ntid(d),
        ("%ctaid", Some(d)) => Special::Ctaid(d),
        ("%nctaid", Some(d)) => Special::Nctaid(d),
        ("%laneid", None) => Special::LaneId,
        ("%warpid", None) => Special::WarpId,
        _ => return None,
    })
}

fn decode_entry(raw: RawEntry, module_shared: &[SharedDecl]) -> Result<Entry, SimError> {
    let mut regs = HashMap::new();
    let mut reg_tys = vec![];
    let mut n = 0u32;
    for (name, count, ty) in &raw.regs {
        match count {
            Some(c) => {
                for i in 0..*c {
                    regs.insert(format!("{name}{i}"), n);
                    reg_tys.push(*ty);
                    n += 1;
                }
            }
            None => {
                regs.insert(name.clone(), n);
                reg_tys.push(*ty);
                n += 1;
            }
        }
    }
    // Shared layout: static variables first, the dynamic (extern, unsized) ones after them.
    let mut shared = HashMap::new();
    let mut off = 0usize;
    let mut dynamic = vec![];
    let mut dyn_align = 16;
    for d in module_shared.iter().chain(&raw.shared) {
        match d.bytes {
            Some(b) => {
                off = off.div_ceil(d.align) * d.align;
                shared.insert(d.name.clone(), off);
                off += b;
            }
            None => {
                dyn_align = dyn_align.max(d.align);
                dynamic.push(d.name.clone());
            }
        }
    }
    let static_shared = off;
    let dynamic_base = off.div_ceil(dyn_align) * dyn_align;
    for d in dynamic {
        shared.insert(d, dynamic_base);
    }
    let mut ctx = Ctx { regs, reg_tys, labels: &raw.labels, shared, params: &raw.params, line: 0, opcode: "" };
    let mut instrs = vec![];
    for ri in &raw.body {
        ctx.line = ri.line;
        ctx.opcode = &ri.opcode;
        let guard = match &ri.guard {
            Some((p, neg)) => Some((ctx.reg(&ROp::Word(p.clone()))?, *neg)),
            None => None,
        };
        let op = decode(&ctx, ri)?;
        instrs.push(Instr { line: ri.line, guard, op });
    }
    Ok(Entry {
        name: raw.name,
        line: raw.line,
        params: raw.params,
        param_bytes: raw.param_bytes,
        nregs: n as usize,
        instrs,
        static_shared,
        dynamic_base,
    })
}

const IGNORED_MODS: &[&str] =
    &["ca", "cg", "cs", "lu", "cv", "wb", "wt", "nc", "volatile", "relaxed", "weak", "cta", "sync", "aligned"];

fn decode(c: &Ctx, ri: &RawInstr) -> Result<Op, SimError> {
    let mut parts: Vec<&str> = ri.opcode.split('.').collect();
    for p in parts.iter_mut() {
        // `.shared::cta` is `.shared` for a CTA without clusters; other `::` scopes are not.
        if let Some((space, scope)) = p.split_once("::").filter(|(s, _)| *s != "L2") {
            if scope != "cta" {
                return Err(c.err(format!("`.{p}` is not supported (only `::cta`)")));
            }
            *p = space;
        }
    }
    let base = parts[0];
    let mods = &parts[1..];
    if let Some(op) = super::decode_tc::decode_tc(c, ri, base, mods) {
        return op;
    }
    let has = |m: &str| mods.contains(&m);
    let types: Vec<Ty> = mods.iter().filter_map(|m| Ty::parse(m)).collect();
    let nops = |n: usize| {
        if ri.ops.len() == n {
            Ok(())
        } else {
            Err(c.err(format!("expects {n} operands, found {}", ri.ops.len())))
        }
    };
    let one_ty = || -> Result<Ty, SimError> {
        match types.as_slice() {
            [t] => Ok(*t),
            _ => Err(c.err("expects exactly one supported type (b32/u32/s32/b64/u64/s64/f32/f64/pred)")),
        }
    };
    const KNOWN: &[&str] = &[
        "mov", "cvt", "cvta", "ld", "st", "add", "sub", "mul", "div", "rem", "min", "max", "shl", "shr", "and", "or",
        "xor", "mad", "fma", "neg", "abs", "not", "ex2", "lg2", "rcp", "sqrt", "rsqrt", "sin", "cos", "setp", "selp",
        "bra", "exit", "ret", "bar", "barrier",
    ];
    if !KNOWN.contains(&base) {
        return Err(c.err("unsupported instruction"));
    }
    for m in mods {
        if matches!(*m, "rz" | "rm" | "rp") && base != "cvt" {
            return Err(c.err(format!("rounding mode `.{m}` is not supported (only .rn)")));
        }
        if matches!(*m, "rz" | "rm" | "rp" | "sat") && base == "cvt" {
            return Err(c.err(format!("`.{m}` is not supported on cvt")));
        }
        if *m == "sat" {
            return Err(c.err("`.sat` is not supported"));
        }
        if matches!(*m, "b8" | "u8" | "s8") {
            return Err(c.err(format!("type `.{m}` is not supported")));
        }
        let moves = matches!(base, "mov" | "ld" | "st" | "cvt");
        if !moves && Ty::parse(m).is_some_and(Ty::is_narrow_float) {
            return Err(c.err(format!("arithmetic on `.{m}` is not supported (only mov, ld, st, cvt and mma)")));
        }
    }
    let ftz = has("ftz");
    let space = || -> Space {
        if has("global") {
            Space::Global
        } else if has("shared") {
            Space::Shared
        } else if has("param") {
            Space::Param
        } else {
            Space::Generic
        }
    };
    let o = &ri.ops;
    Ok(match base {
        "mov" if o.iter().any(|x| matches!(x, ROp::Vec(_))) => {
            nops(2)?;
            super::decode_tc::pack(c, one_ty()?, &o[0], &o[1])?
        }
        "mov" => {
            nops(2)?;
            let ty = one_ty()?;
            Op::Mov { ty, d: c.reg(&o[0])?, a: c.src(&o[1], ty)? }
        }
        "cvt" if types.iter().any(|t| t.is_narrow_float()) => super::decode_tc::cvt_narrow(c, ri, mods, &types)?,
        "cvt" => {
            nops(2)?;
            let [dty, sty] = types.as_slice() else { return Err(c.err("expects a destination and a source type")) };
            let rnd = if has("rn") {
                Rnd::Rn
            } else if has("rni") {
                Rnd::Rni
            } else if has("rzi") {
                Rnd::Rzi
            } else if has("rmi") {
                Rnd::Rmi
            } else if has("rpi") {
                Rnd::Rpi
            } else {
                Rnd::None
            };
            let needs = match (dty.is_float(), sty.is_float()) {
                (true, false) => true,                                 // int -> float: .rn
                (false, true) => true,                                 // float -> int: .rni etc.
                (true, true) => dty.bits() < sty.bits() || dty == sty, // narrowing / to integral
                (false, false) => false,
            };
            if needs && rnd == Rnd::None {
                return Err(c.err("cvt needs a rounding modifier here"));
            }
            if *dty == Ty::Pred || *sty == Ty::Pred {
                return Err(c.err("cvt of predicates"));
            }
            Op::Cvt { dty: *dty, sty: *sty, rnd, ftz, d: c.reg(&o[0])?, a: c.src(&o[1], *sty)? }
        }
        "cvta" => {
            nops(2)?;
            let ty = one_ty()?;
            let sp = space();
            if sp == Space::Generic || sp == Space::Param {
                return Err(c.err("cvta needs .global or .shared"));
            }
            Op::Cvta { to: has("to"), space: sp, ty, d: c.reg(&o[0])?, a: c.src(&o[1], ty)? }
        }
        "ld" | "st" => {
            nops(2)?;
            for m in mods {
                if !(IGNORED_MODS.contains(m)
                    || Ty::parse(m).is_some()
                    || matches!(*m, "global" | "shared" | "param" | "v2" | "v4"))
                {
                    return Err(c.err(format!("unsupported modifier `.{m}`")));
                }
            }
            let ty = one_ty()?;
            if ty == Ty::Pred {
                return Err(c.err("predicate loads/stores"));
            }
            let sp = space();
            let vn = if has("v4") {
                4
            } else if has("v2") {
                2
            } else {
                1
            };
            if vn > 1 {
                return super::decode_tc::ld_st_vector(c, base == "ld", sp, ty, vn, &o[0], &o[1]);
            }
            if base == "ld" && ty == Ty::S16 {
                let d = c.reg(&o[0])?;
                let bits = c.reg_tys[d as usize].bits();
                if bits > 16 {
                    return Ok(Op::LdSext { space: sp, d, addr: c.addr(&o[1], sp)?, bits });
                }
            }
            if base == "ld" {
                Op::Ld { space: sp, ty, d: c.reg(&o[0])?, addr: c.addr(&o[1], sp)? }
            } else {
                if sp == Space::Param {
                    return Err(c.err("st.param is not supported"));
                }
                Op::St { space: sp, ty, addr: c.addr(&o[0], sp)?, a: c.src(&o[1], ty)? }
            }
        }
        "add" | "sub" | "mul" | "div" | "rem" | "min" | "max" | "shl" | "shr" | "and" | "or" | "xor" => {
            nops(3)?;
            let ty = one_ty()?;
            let op = match base {
                "add" => BinOp::Add,
                "sub" => BinOp::Sub,
                "mul" if has("hi") => BinOp::MulHi,
                "mul" if has("wide") => BinOp::MulWide,
                "mul" => BinOp::MulLo,
                "div" => BinOp::Div,
                "rem" => BinOp::Rem,
                "min" if has("NaN") => BinOp::MinNaN,
                "max" if has("NaN") => BinOp::MaxNaN,
                "min" => BinOp::Min,
                "max" => BinOp::Max,
                "shl" => BinOp::Shl,
                "shr" => BinOp::Shr,
                "and" => BinOp::And,
                "or" => BinOp::Or,
                _ => BinOp::Xor,
            };
            if ty == Ty::Pred && !matches!(op, BinOp::And | BinOp::Or | BinOp::Xor) {
                return Err(c.err("arithmetic on predicates"));
            }
            if ty.is_float() && matches!(op, BinOp::Rem | BinOp::Shl | BinOp::Shr | BinOp::And | BinOp::Or | BinOp::Xor)
            {
                return Err(c.err("not defined for floats"));
            }
            if op == BinOp::MulWide && ty.bits() != 32 {
                return Err(c.err("mul.wide takes 32-bit sources"));
            }
            let bty = if matches!(op, BinOp::Shl | BinOp::Shr) { Ty::U32 } else { ty };
            Op::Bin { op, ty, ftz, d: c.reg(&o[0])?, a: c.src(&o[1], ty)?, b: c.src(&o[2], bty)? }
        }
        "mad" | "fma" => {
            nops(4)?;
            let ty = one_ty()?;
            let mode = if ty.is_float() {
                if !has("rn") {
                    return Err(c.err("float mad/fma needs .rn"));
                }
                MadMode::Fma
            } else if base == "fma" {
                return Err(c.err("fma on integers"));
            } else if has("hi") {
                MadMode::Hi
            } else if has("wide") {
                if ty.bits() != 32 {
                    return Err(c.err("mad.wide takes 32-bit sources"));
                }
                MadMode::Wide
            } else {
                MadMode::Lo
            };
            let cty = match (mode, ty) {
                (MadMode::Wide, Ty::S32) => Ty::S64,
                (MadMode::Wide, _) => Ty::U64,
                _ => ty,
            };
            Op::Mad {
                mode,
                ty,
                ftz,
                d: c.reg(&o[0])?,
                a: c.src(&o[1], ty)?,
                b: c.src(&o[2], ty)?,
                c: c.src(&o[3], cty)?,
            }
        }
        "neg" | "abs" | "not" | "ex2" | "lg2" | "rcp" | "sqrt" | "rsqrt" | "sin" | "cos" => {
            nops(2)?;
            let ty = one_ty()?;
            let op = match base {
                "neg" => UnOp::Neg,
                "abs" => UnOp::Abs,
                "not" => UnOp::Not,
                "ex2" => UnOp::Ex2,
                "lg2" => UnOp::Lg2,
                "rcp" => UnOp::Rcp,
                "sqrt" => UnOp::Sqrt,
                "rsqrt" => UnOp::Rsqrt,
                "sin" => UnOp::Sin,
                _ => UnOp::Cos,
            };
            if matches!(op, UnOp::Ex2 | UnOp::Lg2 | UnOp::Rsqrt | UnOp::Sin | UnOp::Cos) && !has("approx") {
                return Err(c.err("needs .approx"));
            }
            if !ty.is_float() && !matches!(op, UnOp::Neg | UnOp::Abs | UnOp::Not) {
                return Err(c.err("needs a float type"));
            }
            if ty.is_float() && op == UnOp::Not {
                return Err(c.err("not on floats"));
            }
            if ty == Ty::Pred && op != UnOp::Not {
                return Err(c.err("arithmetic on predicates"));
            }
            Op::Un { op, ty, ftz, d: c.reg(&o[0])?, a: c.src(&o[1], ty)? }
        }
        "setp" => {
            let ty = one_ty()?;
            let cmp = mods
                .iter()
                .find_map(|m| {
                    Some(match *m {
                        "eq" => Cmp::Eq,
                        "ne" => Cmp::Ne,
                        "lt" => Cmp::Lt,
                        "le" => Cmp::Le,
                        "gt" => Cmp::Gt,
                        "ge" => Cmp::Ge,
                        "lo" => Cmp::Lo,
                        "ls" => Cmp::Ls,
                        "hi" => Cmp::Hi,
                        "hs" => Cmp::Hs,
                        "equ" => Cmp::Equ,
                        "neu" => Cmp::Neu,
                        "ltu" => Cmp::Ltu,
                        "leu" => Cmp::Leu,
                        "gtu" => Cmp::Gtu,
                        "geu" => Cmp::Geu,
                        "num" => Cmp::Num,
                        "nan" => Cmp::Nan,
                        _ => return None,
                    })
                })
                .ok_or_else(|| c.err("missing comparison"))?;
            let float_only =
                matches!(cmp, Cmp::Equ | Cmp::Neu | Cmp::Ltu | Cmp::Leu | Cmp::Gtu | Cmp::Geu | Cmp::Num | Cmp::Nan);
            if float_only && !ty.is_float() {
                return Err(c.err("unordered comparison on integers"));
            }
            if matches!(cmp, Cmp::Lo | Cmp::Ls | Cmp::Hi | Cmp::Hs) && ty.is_float() {
                return Err(c.err("unsigned comparison on floats"));
            }
            let bop = if has("and") {
                Some(BoolOp::And)
            } else if has("or") {
                Some(BoolOp::Or)
            } else if has("xor") {
                Some(BoolOp::Xor)
            } else {
                None
            };
            nops(if bop.is_some() { 4 } else { 3 })?;
            let combine = match bop {
                Some(b) => {
                    let (ROp::Word(w), neg) = (&o[3], false) else { return Err(c.err("expected a predicate")) };
                    let _ = neg;
                    Some((b, Src::Reg(c.reg(&ROp::Word(w.clone()))?)))
                }
                None => None,
            };
            Op::Setp { cmp, ty, ftz, p: c.reg(&o[0])?, a: c.src(&o[1], ty)?, b: c.src(&o[2], ty)?, combine }
        }
        "selp" => {
            nops(4)?;
            let ty = one_ty()?;
            Op::Selp { ty, d: c.reg(&o[0])?, a: c.src(&o[1], ty)?, b: c.src(&o[2], ty)?, p: c.src(&o[3], Ty::Pred)? }
        }
        "bra" => {
            nops(1)?;
            let ROp::Word(l) = &o[0] else { return Err(c.err("expected a label")) };
            let target = *c.labels.get(l).ok_or_else(|| c.err(format!("undefined label `{l}`")))?;
            Op::Bra { target, uni: has("uni") }
        }
        "exit" | "ret" => {
            nops(0)?;
            Op::Exit
        }
        "bar" | "barrier" => {
            if has("arrive") || has("red") {
                return Err(c.err("only bar.sync is supported"));
            }
            if o.len() == 2 {
                return Err(c.err("bar.sync with a thread count is not supported"));
            }
            nops(1)?;
            Op::Bar { id: c.src(&o[0], Ty::U32)? }
        }
        _ => return Err(c.err("unsupported instruction")),
    })
}
