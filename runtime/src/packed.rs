//! Launches over sequences of different lengths: a varlen batch packed along T (FLA's
//! `cu_seqlens`: sequence n is tokens `cu[n]..cu[n+1]` of a batch of one), optionally with
//! its states kept in a pool of slots (a serving engine's decode step: sequence n reads and
//! writes slot `slots[n]` of the pool, in place).
//!
//! Nothing here is compiled for it: every kernel addresses batch `b`, token `t` as
//! `(b * T + t) * H * D`, so at batch 0 a kernel reads only from where its parameters begin.
//! The executor hands each sequence its own parameter pointers (the sequence's first token,
//! its state row or slot, its share of the intermediates) and calls the kernel at batch 0
//! with the sequence's length; chunk boundaries restart at every sequence because every
//! sequence is a whole launch of its own to the kernel. The grid is (sequence, head,
//! V-tile), longest sequences first, so that a long one does not start last.

use crate::cpu_kernel::CpuKernel;
use crate::exec::{Order, Scratch};
use crate::program::{Access, Dim, ProgramSpec, Role, Sizes, SpecError};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A caller's tensor for a packed launch: the whole packed tensor (`[1, ΣT, H, D]` for a
/// per-token one, `[N, H, ...]` for a state), read or written.
pub enum Bound<'a> {
    In(&'a [f32]),
    Out(&'a mut [f32]),
}

/// States kept in pools of slots: sequence n reads its initial states from slot `slots[n]`
/// of each pool and writes its final states back there, in place. Slot −1 starts from zeros
/// and keeps nothing (a padding row).
pub struct Pools<'a> {
    pub slots: &'a [i64],
    /// (state stem, pool) pairs: stem `h` is the states `h0` and `hT`, stem `n` is `n0` and
    /// `nT`; a pool holds whole `[H, ...]` state rows, one per slot.
    pub pools: Vec<(String, &'a mut [f32])>,
}

struct SendPtrs(Vec<Vec<*mut f32>>);
// SAFETY: each sequence's pointers address disjoint regions of the outputs, intermediates
// and pool slots (checked before the launch), and the kernel writes disjoint elements per
// (head, V-tile) within a sequence (CpuKernel's contract).
unsafe impl Sync for SendPtrs {}
unsafe impl Send for SendPtrs {}

/// The state tensors of `stem` (`h` → `h0`, `hT`), when the program has that pair.
fn state_pair(stem: &str) -> (String, String) {
    (format!("{stem}0"), format!("{stem}T"))
}

/// Whether `t` has a row per sequence (a batch, token or chunk dimension); a tensor without
/// one (a per-head parameter) is the same for every sequence.
fn per_sequence(dims: &[Dim]) -> bool {
    dims.iter().any(|d| matches!(d, Dim::Batch | Dim::SeqLen | Dim::Chunks))
}

/// Runs the phases of `spec` over the packed sequences of lengths `lens`. `tensors` binds
/// the caller's inputs (an optional one may be absent: zeros) and outputs by name; with
/// `pools`, the pooled states are not in `tensors`. Intermediates are allocated here, one
/// share per sequence. Every length and slot is checked before anything runs.
pub fn run_packed(
    spec: &ProgramSpec,
    kernels: &[&dyn CpuKernel],
    lens: &[usize],
    tensors: &mut BTreeMap<String, Bound<'_>>,
    mut pools: Option<Pools<'_>>,
    order: Order,
) -> Result<(), SpecError> {
    let err = |m: String| Err(SpecError(m));
    if kernels.len() != spec.phases.len() {
        return err(format!("program {}: {} kernels for {} phases", spec.name, kernels.len(), spec.phases.len()));
    }
    if lens.is_empty() {
        return err("a packed batch needs at least one sequence".into());
    }
    if let Some(n) = lens.iter().position(|&l| l == 0) {
        return err(format!("sequence {n} is empty (cu_seqlens must increase strictly)"));
    }
    let c = spec.compiled_for;
    let sizes = |len: usize| Sizes { batch: 1, seq_len: len, heads: c.heads, k: c.k, v: c.v };
    let pooled = pooled_tensors(spec, lens, pools.as_ref())?;

    let mut owned: Vec<Vec<f32>> = vec![];
    let mut placed: BTreeMap<String, Vec<*mut f32>> = BTreeMap::new();
    for t in &spec.tensors {
        let per: Vec<usize> = lens.iter().map(|&l| spec.numel(t, &sizes(l))).collect::<Result<_, _>>()?;
        // Each sequence's share begins where the previous one's ends; a tensor without a row
        // per sequence is shared whole.
        let shared = !per_sequence(&t.dims);
        let mut offsets = Vec::with_capacity(lens.len());
        let mut total = 0usize;
        for &p in &per {
            offsets.push(if shared { 0 } else { total });
            total = total.checked_add(p).ok_or_else(|| SpecError(format!("tensor `{}` is too large", t.name)))?;
        }
        if shared {
            total = per[0];
        }
        let at = |base: *mut f32, offsets: &[usize]| -> Vec<*mut f32> {
            // SAFETY: every offset plus its share lies inside the buffer (its length was
            // checked against the total, or it was allocated with it).
            offsets.iter().map(|&o| unsafe { base.add(o) }).collect()
        };
        let ptrs = if let Some((stem, slots)) = pooled.get(&t.name) {
            // A pooled state: its slot's row of the pool, or a private row for slot −1
            // (zeros in; what is written there is dropped).
            let pool = pools.as_mut().and_then(|p| p.pools.iter_mut().find(|(s, _)| s == stem)).map(|(_, d)| d);
            let Some(pool) = pool else { return err(format!("no pool for state `{}`", t.name)) };
            let row = per[0];
            let mut padding = vec![0.0f32; row * slots.iter().filter(|s| s.is_none()).count()];
            let (pool_ptr, pad_ptr) = (pool.as_mut_ptr(), padding.as_mut_ptr());
            let mut pads = 0;
            let mut ptrs = Vec::with_capacity(slots.len());
            for slot in slots {
                ptrs.push(match slot {
                    // SAFETY: `pooled_tensors` checked every slot is below the pool's rows.
                    Some(s) => unsafe { pool_ptr.add(s * row) },
                    None => {
                        pads += 1;
                        // SAFETY: one padding row was allocated per slot −1.
                        unsafe { pad_ptr.add((pads - 1) * row) }
                    }
                });
            }
            owned.push(padding);
            ptrs
        } else {
            match (t.role, tensors.get_mut(&t.name)) {
                (Role::Input, Some(Bound::In(data))) if data.len() == total => at(data.as_ptr() as *mut f32, &offsets),
                (Role::Output, Some(Bound::Out(data))) if data.len() == total => at(data.as_mut_ptr(), &offsets),
                (Role::Input, Some(Bound::Out(_))) => return err(format!("input `{}` was bound for writing", t.name)),
                (Role::Output, Some(Bound::In(_))) => return err(format!("output `{}` was bound read-only", t.name)),
                (Role::Intermediate, Some(_)) => {
                    return err(format!(
                        "`{}` is an intermediate of program {}, not a caller's tensor",
                        t.name, spec.name
                    ))
                }
                (_, Some(Bound::In(data))) => return wrong_length(spec, &t.name, &t.dims_label(), total, data.len()),
                (_, Some(Bound::Out(data))) => return wrong_length(spec, &t.name, &t.dims_label(), total, data.len()),
                (Role::Input, None) if t.optional => {
                    // Zeros that every sequence reads: the longest share serves them all.
                    let mut zeros = vec![0.0f32; per.iter().copied().max().unwrap_or(0)];
                    let ptrs = vec![zeros.as_mut_ptr(); lens.len()];
                    owned.push(zeros);
                    ptrs
                }
                (Role::Input, None) => return err(format!("program {}: no tensor for input `{}`", spec.name, t.name)),
                (Role::Output, None) => {
                    return err(format!("program {}: no buffer for output `{}`", spec.name, t.name))
                }
                (Role::Intermediate, None) => {
                    let mut data = vec![f32::NAN; total];
                    let ptrs = at(data.as_mut_ptr(), &offsets);
                    owned.push(data);
                    ptrs
                }
            }
        };
        placed.insert(t.name.clone(), ptrs);
    }
    for name in tensors.keys() {
        if spec.tensor(name).is_none() {
            return err(format!("program {} has no tensor `{name}`", spec.name));
        }
    }

    // Longest sequences first.
    let mut order_of: Vec<usize> = (0..lens.len()).collect();
    order_of.sort_by_key(|&n| std::cmp::Reverse(lens[n]));
    for (phase, kernel) in spec.phases.iter().zip(kernels) {
        if kernel.entry() != phase.entry || kernel.vtiles().max(1) != phase.vtiles {
            return err(format!("program {}: kernel {} is not phase {}", spec.name, kernel.entry(), phase.entry));
        }
        let mut table = Vec::with_capacity(lens.len());
        for n in 0..lens.len() {
            let mut ptrs = Vec::with_capacity(phase.params.len());
            for param in &phase.params {
                let Some(p) = placed.get(&param.tensor) else {
                    return err(format!("program {}: no memory for `{}`", spec.name, param.tensor));
                };
                ptrs.push(p[n]);
            }
            table.push(ptrs);
        }
        // SAFETY: every pointer addresses its sequence's share of a buffer of the checked
        // length, for the sizes the kernels were compiled for; phases run one after the other.
        unsafe { launch_sequences(*kernel, &SendPtrs(table), lens, &order_of, c.heads, order) };
    }
    drop(owned);
    Ok(())
}

fn wrong_length(spec: &ProgramSpec, name: &str, dims: &str, want: usize, got: usize) -> Result<(), SpecError> {
    Err(SpecError(format!(
        "tensor `{name}` {dims}: the packed sequences need {want} elements, got {got} (program {})",
        spec.name
    )))
}

/// The pooled state tensors: name → (stem, each sequence's slot, None for −1), after checking
/// the slots (one per sequence, in range, no slot twice) and that the program may update the
/// pool in place (no phase reads a state after a phase wrote it).
type PooledTensors = BTreeMap<String, (String, Vec<Option<usize>>)>;

fn pooled_tensors(spec: &ProgramSpec, lens: &[usize], pools: Option<&Pools<'_>>) -> Result<PooledTensors, SpecError> {
    let err = |m: String| Err(SpecError(m));
    let Some(pools) = pools else { return Ok(BTreeMap::new()) };
    if pools.slots.len() != lens.len() {
        return err(format!("state_indices has {} entries for {} sequences", pools.slots.len(), lens.len()));
    }
    let c = spec.compiled_for;
    let mut out = BTreeMap::new();
    for (stem, data) in &pools.pools {
        let (first, last) = state_pair(stem);
        let (Some(t0), Some(_)) = (spec.tensor(&first), spec.tensor(&last)) else {
            return err(format!("program {} has no state `{stem}` (no `{first}` and `{last}`)", spec.name));
        };
        let row = spec.numel(t0, &Sizes { batch: 1, seq_len: 1, heads: c.heads, k: c.k, v: c.v })?;
        if row == 0 || data.len() % row != 0 {
            return err(format!(
                "the `{stem}` pool has {} elements, not a whole number of {}-element state rows {}",
                data.len(),
                row,
                t0.dims_label()
            ));
        }
        let slots = slot_rows(pools.slots, data.len() / row)?;
        let read_last = spec.phases.iter().rposition(|p| p.params.iter().any(|q| q.tensor == first));
        let write_first =
            spec.phases.iter().position(|p| p.params.iter().any(|q| q.tensor == last && q.access == Access::Write));
        if let (Some(r), Some(w)) = (read_last, write_first) {
            if r > w {
                return err(format!(
                    "program {} reads `{first}` after writing `{last}`, so its states cannot be updated in place (use the fused program)",
                    spec.name
                ));
            }
        }
        out.insert(first, (stem.clone(), slots.clone()));
        out.insert(last, (stem.clone(), slots));
    }
    for s in &spec.tensors {
        if s.role == Role::Input && s.optional && s.name.ends_with('0') && !out.contains_key(&s.name) {
            let stem = s.name.trim_end_matches('0');
            if spec.tensor(&format!("{stem}T")).is_some() {
                return err(format!("the decode step needs a pool for every state; `{stem}` has none"));
            }
        }
    }
    Ok(out)
}

/// Each sequence's pool row for `slots` (`state_indices`) over a pool of `rows` slots: None
/// for −1; an error for a slot out of range or taken twice.
pub fn slot_rows(slots: &[i64], rows: usize) -> Result<Vec<Option<usize>>, SpecError> {
    let mut out = Vec::with_capacity(slots.len());
    for (n, &s) in slots.iter().enumerate() {
        out.push(match s {
            -1 => None,
            s if s >= 0 && (s as usize) < rows => Some(s as usize),
            s => return Err(SpecError(format!("state_indices[{n}] = {s}: the pool has slots 0..{rows} (or -1)"))),
        });
        if let Some(m) = slots[..n].iter().position(|&x| x == s && s >= 0) {
            return Err(SpecError(format!("state_indices[{m}] and state_indices[{n}] are both slot {s}")));
        }
    }
    Ok(out)
}

/// Runs `kernel` over (sequence, head, V-tile) points, each sequence at batch 0 with its own
/// parameter pointers and length, sequences in `order_of`'s order.
///
/// # Safety
/// `table[n]` must hold, for sequence n, one pointer per kernel parameter covering every
/// element the kernel touches at batch 0 for `lens[n]` tokens, and sequences must not share
/// written elements.
unsafe fn launch_sequences(
    kernel: &dyn CpuKernel,
    table: &SendPtrs,
    lens: &[usize],
    order_of: &[usize],
    heads: usize,
    order: Order,
) {
    let vtiles = kernel.vtiles().max(1);
    let points = order_of.len() * heads * vtiles;
    let threads = order.threads.max(1).min(points.max(1));
    let next = AtomicUsize::new(0);
    let bytes = kernel.workspace_bytes().max(64);
    let work = || {
        let mut scratch = Scratch::new(bytes, order.poison_scratch);
        let ws = scratch.ptr();
        loop {
            let p = next.fetch_add(1, Ordering::Relaxed);
            if p >= points {
                break;
            }
            let n = order_of[p / (heads * vtiles)];
            let (h, vt) = ((p / vtiles) % heads, p % vtiles);
            // SAFETY: the caller's contract.
            unsafe { kernel.call_tile(table.0[n].as_ptr(), 0, h as i64, vt as i64, lens[n] as i64, ws) };
        }
    };
    if threads == 1 {
        work();
    } else {
        let work = &work;
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(work);
            }
        });
    }
}
