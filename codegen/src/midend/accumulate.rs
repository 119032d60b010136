//! A product added to a value takes the value as its accumulator: `add(x, dot(a, b))`, the
//! dot used nowhere else, becomes `dot(a, b, acc = x)`.
//!
//! The rules write sums of products as sums (`S + outer(k, u)`, an output's inter- and
//! intra-chunk parts), and lowered as written each costs a pass that writes the product and
//! one that reads it back beside `x`; the recurrent kernel's rank-1 update of a 64 KB state
//! is two of its passes over the state. With the accumulator the product adds `x` as it
//! writes each element, which is what the `Dot` contract computes (the sum over the inner
//! dimension, then the accumulator added), so the value is the same.

use std::collections::HashMap;

use crate::ir::*;

/// The kernel with every such add folded into its product (see the module doc).
pub(super) fn fold_sums_into_products(kernel: &Kernel) -> Kernel {
    let mut uses: HashMap<ValueId, usize> = HashMap::new();
    count_uses(&kernel.body, &mut uses);
    let mut out = kernel.clone();
    out.body = block(kernel, &kernel.body, &uses);
    out
}

fn count_uses(stmts: &[Stmt], uses: &mut HashMap<ValueId, usize>) {
    for s in stmts {
        let read = match s {
            Stmt::Let { op, .. } => op.operands(),
            Stmt::Store { value, .. } => vec![*value],
            Stmt::Loop { carried, body, yields, .. } => {
                count_uses(body, uses);
                carried.iter().map(|&(_, init)| init).chain(yields.iter().copied()).collect()
            }
        };
        for v in read {
            *uses.entry(v).or_default() += 1;
        }
    }
}

fn block(kernel: &Kernel, stmts: &[Stmt], uses: &HashMap<ValueId, usize>) -> Vec<Stmt> {
    // The products of this list that nothing reads but one add, and have no accumulator.
    let foldable: HashMap<ValueId, Op> = stmts
        .iter()
        .filter_map(|s| match s {
            Stmt::Let { id, op: op @ Op::Dot { acc: None, .. } } if uses.get(id) == Some(&1) => Some((*id, op.clone())),
            _ => None,
        })
        .collect();
    let mut folded: Vec<ValueId> = vec![];
    let mut out: Vec<Stmt> = stmts
        .iter()
        .map(|s| match s {
            Stmt::Let { id, op: Op::Binary { op: BinOp::Add, a, b } } => {
                let ty = kernel.ty(*id);
                let pick = [(*b, *a), (*a, *b)].into_iter().find(|(d, x)| {
                    foldable.contains_key(d)
                        && d != x
                        && kernel.ty(*d) == ty
                        && kernel.ty(*x) == ty
                        && !folded.contains(d)
                });
                match pick {
                    Some((d, x)) => {
                        folded.push(d);
                        let Some(Op::Dot { a, b, ta, tb, .. }) = foldable.get(&d).cloned() else {
                            unreachable!("foldable holds dots only")
                        };
                        Stmt::Let { id: *id, op: Op::Dot { a, b, ta, tb, acc: Some(x) } }
                    }
                    None => s.clone(),
                }
            }
            Stmt::Loop { count, carried, body, yields, results } => Stmt::Loop {
                count: count.clone(),
                carried: carried.clone(),
                body: block(kernel, body, uses),
                yields: yields.clone(),
                results: results.clone(),
            },
            _ => s.clone(),
        })
        .collect();
    // The folded products now stand at their adds (after every operand they read).
    out.retain(|s| !matches!(s, Stmt::Let { id, .. } if folded.contains(id)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::Builder;

    /// `S' = 0.9 S + k^T k` over a loop, `o = k S'`; with `reuse`, the product is read twice.
    fn scan(reuse: bool) -> (Kernel, ValueId) {
        let mut b = Builder::new("scan");
        let (pk, ps0, po) = (b.param("k", Access::Read), b.param("s0", Access::Read), b.param("o", Access::Write));
        let s0 = b.load(ps0, Idx::c(0), 4, 1, 4, 4, Idx::c(4));
        let s = b.begin_loop(Idx::var(IdxVar::SeqLen), &[s0])[0];
        let k = b.load(pk, Idx::c(0), 4, 1, 1, 4, Idx::c(1));
        let d = b.scalar(0.9);
        let decayed = b.mul(s, d);
        let outer = b.dot(k, k, true, false, None);
        let next = b.add(decayed, outer);
        let o = b.dot(k, next, false, false, None);
        b.store(o, po, Idx::c(0), 4, 1, Idx::c(1));
        if reuse {
            b.store(outer, po, Idx::c(4), 4, 1, Idx::c(4));
        }
        let out = b.end_loop(&[next])[0];
        b.store(out, po, Idx::c(20), 4, 1, Idx::c(4));
        (b.finish(), next)
    }

    fn op_of(k: &Kernel, v: ValueId) -> Option<Op> {
        fn find(stmts: &[Stmt], v: ValueId) -> Option<Op> {
            stmts.iter().find_map(|s| match s {
                Stmt::Let { id, op } if *id == v => Some(op.clone()),
                Stmt::Loop { body, .. } => find(body, v),
                _ => None,
            })
        }
        find(&k.body, v)
    }

    #[test]
    fn a_product_read_only_by_an_add_takes_the_other_term_as_its_accumulator() {
        let (k, next) = scan(false);
        let folded = fold_sums_into_products(&k);
        assert!(matches!(op_of(&folded, next), Some(Op::Dot { acc: Some(_), ta: true, .. })), "{folded}");
        crate::midend::layout::plan(&folded).expect("the folded kernel is well formed");
        let count = |k: &Kernel, what: &str| k.to_string().matches(what).count();
        assert_eq!(count(&folded, " = add "), count(&k, " = add ") - 1, "{folded}");
        assert_eq!(count(&folded, " = dot "), count(&k, " = dot "), "the product's own statement is gone: {folded}");
        // The same values either way: the interpreter on both, three tokens.
        let run = |k: &Kernel| {
            let mut kk = vec![0.5f32, -1.0, 0.25, 2.0];
            let mut s0: Vec<f32> = (0..16).map(|i| i as f32 / 8.0).collect();
            let mut o = vec![f32::NAN; 36];
            let mut params: Vec<&mut [f32]> = vec![&mut kk, &mut s0, &mut o];
            crate::interp::run(k, &mut params, 0, 0, 3).expect("runs");
            o
        };
        let (before, after) = (run(&k), run(&folded));
        // `o` of the last token, then the final state (nothing writes 4..20 here).
        assert!(before[..4].iter().chain(&before[20..]).all(|x| x.is_finite()), "{before:?}");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&before), bits(&after));
        let (k, next) = scan(true);
        assert!(
            matches!(op_of(&fold_sums_into_products(&k), next), Some(Op::Binary { .. })),
            "a product read twice stays"
        );
    }
}
