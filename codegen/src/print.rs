//! Readable text of a tile-IR kernel (what `chunkc compile --target cpu` prints).

use crate::ir::*;
use std::fmt::{self, Write as _};

impl fmt::Display for Idx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Idx::Const(c) => write!(f, "{c}"),
            Idx::Var(v) => f.write_str(match v {
                IdxVar::Batch => "b",
                IdxVar::Head => "h",
                IdxVar::SeqLen => "T",
                IdxVar::Iter => "i",
                IdxVar::VTile => "vt",
            }),
            Idx::Add(a, b) => write!(f, "({a} + {b})"),
            Idx::Sub(a, b) => write!(f, "({a} - {b})"),
            Idx::Mul(a, b) => write!(f, "{a}*{b}"),
            Idx::Min(a, b) => write!(f, "min({a}, {b})"),
            Idx::CeilDiv(a, d) => write!(f, "ceil({a} / {d})"),
        }
    }
}

impl fmt::Display for TileTy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = match self.dtype {
            DType::F32 => "f32",
            DType::F64 => "f64",
        };
        write!(f, "{d}[{}x{}]", self.rows, self.cols)
    }
}

fn op_text(k: &Kernel, op: &Op) -> String {
    let p = |i: usize| k.params[i].name.clone();
    match op {
        Op::Load { elem, param, base, row_stride, col_stride, valid_rows, .. } => {
            let ty = if *elem == ElemType::F32 { String::new() } else { format!(".{}", elem.name()) };
            format!("load{ty} {}[{base} + r*{row_stride} + c*{col_stride}] rows<{valid_rows}", p(*param))
        }
        Op::Const { value, .. } => format!("const {value}"),
        Op::IdxValue(i) => format!("index {i}"),
        Op::Unary { op, x } => format!("{op:?} {x}").to_lowercase(),
        Op::Binary { op, a, b } => format!("{} {a}, {b}", format!("{op:?}").to_lowercase()),
        Op::Cast { x, dtype } => format!("cast {x} to {dtype:?}").to_lowercase(),
        Op::Dot { a, b, ta, tb, acc } => format!(
            "dot {a}{}, {b}{}{}",
            if *ta { "^T" } else { "" },
            if *tb { "^T" } else { "" },
            acc.map(|c| format!(" + {c}")).unwrap_or_default()
        ),
        Op::Cumsum { x, exclusive } => format!("cumsum{} {x}", if *exclusive { ".exclusive" } else { "" }),
        Op::RowSum { x } => format!("rowsum {x}"),
        Op::Rows { x, start, len } => format!("rows {x}[{start}..{}]", start + len),
        Op::Transpose { x } => format!("transpose {x}"),
        Op::Concat { parts } => {
            format!("concat {}", parts.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", "))
        }
        Op::Mask { x, mask, fill } => match mask {
            MaskKind::Tril { strict } => format!("mask.{} {x} fill {fill}", if *strict { "stril" } else { "tril" }),
            MaskKind::RowsBefore(i) => format!("mask.rows<{i} {x} fill {fill}"),
        },
        Op::GatedDot { a, ga, b, gb, strict } => {
            format!("gated_dot{} {a} exp({ga}), {b} exp(-{gb})", if *strict { ".strict" } else { "" })
        }
        Op::GatedMatMul { m, x, gx, gy, transposed, strict } => format!(
            "gated_matmul{}{} {m}, {x} gates {gx}, {gy}",
            if *transposed { ".t" } else { "" },
            if *strict { ".strict" } else { "" }
        ),
        Op::SolveUnitLower { l, b } => format!("solve_unit_lower {l}, {b}"),
    }
}

fn block(k: &Kernel, stmts: &[Stmt], indent: usize, s: &mut String) {
    let pad = "  ".repeat(indent);
    for st in stmts {
        match st {
            Stmt::Let { id, op } => {
                let _ = writeln!(s, "{pad}{id}: {} = {}", k.ty(*id), op_text(k, op));
            }
            Stmt::Store { value, param, base, row_stride, col_stride, valid_rows } => {
                let _ = writeln!(
                    s,
                    "{pad}store {value} -> {}[{base} + r*{row_stride} + c*{col_stride}] rows<{valid_rows}",
                    k.params[*param].name
                );
            }
            Stmt::Loop { count, carried, body, yields, results } => {
                let c: Vec<String> = carried.iter().map(|(i, init)| format!("{i} = {init}")).collect();
                let _ = writeln!(s, "{pad}loop i in 0..{count} carry ({}) {{", c.join(", "));
                block(k, body, indent + 1, s);
                let y: Vec<String> = yields.iter().map(|y| y.to_string()).collect();
                let r: Vec<String> = results.iter().map(|r| r.to_string()).collect();
                let _ = writeln!(s, "{pad}  yield {}\n{pad}}} -> {}", y.join(", "), r.join(", "));
            }
        }
    }
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let params: Vec<String> = self
            .params
            .iter()
            .map(|p| format!("{}{}", if p.access == Access::Write { "out " } else { "" }, p.name))
            .collect();
        writeln!(f, "kernel {}({}) per (b, h):", self.name, params.join(", "))?;
        let mut s = String::new();
        block(self, &self.body, 1, &mut s);
        f.write_str(&s)
    }
}
