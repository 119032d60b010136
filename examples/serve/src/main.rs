//! A serving loop, as a continuous-batching engine runs a Gated DeltaNet layer: sequences
//! join with prompts of different lengths (one varlen prefill for all that join at a step),
//! then advance one token per decode step, each in its own slot of a state pool; some leave
//! and others take their slots. At the end, every sequence is run again alone, all its
//! tokens in one dense forward, and its outputs and final state are compared with what the
//! engine produced. Exits non-zero when any sequence differs by more than f32 tolerance.
//!
//!     cargo run --release -p serve

use chunkc::dsl::reference::Dims;
use chunkc::runtime::tensor::Tensor;
use chunkc::verify::{random_inputs, rel_rms};
use chunkc::{compile, Error, Heads, Inputs, Rule, Schedule, Target, TensorRef};
use std::collections::BTreeMap;

const HEADS: usize = 4;
const K: usize = 32;
const V: usize = 32;
const SLOTS: usize = 4;
/// Relative RMS error allowed between the engine and a sequence run alone: the prefill is
/// the chunked kernel, the decode the rule's decode schedule, and the check the chunked kernel over
/// the whole sequence, so they differ by f32 rounding only.
const TOLERANCE: f64 = 1e-5;

/// One sequence's tokens so far (per-token inputs, `[1, t, H, D]` each) and what the engine
/// answered for them.
struct Sequence {
    id: usize,
    slot: usize,
    tokens: BTreeMap<String, Tensor>,
    outputs: Vec<f32>,
    left_after: usize,
    /// Its state when it left (or at the end), read from its slot.
    final_state: Vec<f32>,
}

fn main() {
    if let Err(e) = serve() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// Token inputs for `n` sequences of `t` tokens (`[n, t, H, D]`), drawn as `chunkc verify`
/// draws them (unit-norm keys, log gates, betas in (0, 1)).
fn draw(rule: &Rule, n: usize, t: usize, seed: u64) -> BTreeMap<String, Tensor> {
    let mut tensors = random_inputs(rule.ast(), &Dims { batch: n, seq_len: t, heads: HEADS, k: K, v: V }, seed);
    tensors.retain(|name, _| rule.ast().input(name).is_some());
    tensors
}

fn views(tensors: &BTreeMap<String, Tensor>) -> Result<Inputs<'_>, Error> {
    let mut inputs = Inputs::new();
    for (name, t) in tensors {
        inputs.insert(name, TensorRef::f32(&t.data, &t.shape)?);
    }
    Ok(inputs)
}

/// `t`'s rows `range` along axis `axis` (0: sequences, 1: tokens).
fn rows(t: &Tensor, axis: usize, range: std::ops::Range<usize>) -> Tensor {
    let inner: usize = t.shape[axis + 1..].iter().product();
    let outer: usize = t.shape[..axis].iter().product();
    let mut shape = t.shape.clone();
    shape[axis] = range.len();
    let mut data = Vec::with_capacity(outer * range.len() * inner);
    for o in 0..outer {
        let base = o * t.shape[axis] * inner;
        data.extend_from_slice(&t.data[base + range.start * inner..base + range.end * inner]);
    }
    Tensor { shape, data }
}

/// `a` then `b` along the token axis of `[1, t, H, D]` tensors.
fn append(a: &mut Tensor, b: &Tensor) {
    a.shape[1] += b.shape[1];
    a.data.extend_from_slice(&b.data);
}

fn serve() -> Result<(), Error> {
    let rule = Rule::load(concat!(env!("CARGO_MANIFEST_DIR"), "/../../rules/gated_delta_rule.toml"))?;
    let heads = Heads::new(HEADS, K, V);
    let prefill = compile(&rule, Target::Cpu, Schedule::chunked(16), heads)?;
    let decoder = compile(&rule, Target::Cpu, rule.decode_schedule(), heads)?;
    let mut pool = decoder.state_pool(SLOTS);

    // (step at which it arrives, prompt length, decode steps it stays for)
    let arrivals = [(0, 37, 6), (0, 5, 12), (0, 64, 3), (2, 17, 8), (4, 1, 5), (5, 90, 4), (7, 23, 6)];
    let mut waiting: Vec<(usize, usize, usize)> = vec![];
    let mut active: Vec<Sequence> = vec![];
    let mut done: Vec<Sequence> = vec![];
    let mut seed = 1000;
    for step in 0..20 {
        // Sequences whose time is up leave with their state; their slots are cleared.
        let (leaving, staying): (Vec<_>, Vec<_>) = active.into_iter().partition(|s| s.left_after == step);
        active = staying;
        for mut s in leaving {
            s.final_state = pool.state("h", s.slot)?.to_vec();
            pool.clear(s.slot)?;
            println!("step {step:2}: sequence {} leaves slot {}", s.id, s.slot);
            done.push(s);
        }
        // Arrivals wait for free slots; those that get one are prefilled together, as one
        // varlen batch.
        waiting.extend(arrivals.iter().enumerate().filter(|(_, a)| a.0 == step).map(|(id, a)| (id, a.1, a.2)));
        let free: Vec<usize> = (0..SLOTS).filter(|slot| active.iter().all(|s| s.slot != *slot)).collect();
        let joining: Vec<(usize, usize, usize)> = waiting.drain(..free.len().min(waiting.len())).collect();
        if !joining.is_empty() {
            let total: usize = joining.iter().map(|j| j.1).sum();
            seed += 1;
            let packed = draw(&rule, 1, total, seed);
            let mut cu = vec![0i64];
            for j in &joining {
                cu.push(cu[cu.len() - 1] + j.1 as i64);
            }
            let out = prefill.forward_varlen(&views(&packed)?, cu.as_slice())?;
            for (n, &(id, len, stay)) in joining.iter().enumerate() {
                let range = cu[n] as usize..cu[n + 1] as usize;
                let slot = free[n];
                pool.state_mut("h", slot)?.copy_from_slice(&rows(out.ht(), 0, n..n + 1).data);
                let tokens = packed.iter().map(|(k, t)| (k.clone(), rows(t, 1, range.clone()))).collect();
                let outputs = rows(out.o(), 1, range).data;
                active.push(Sequence { id, slot, tokens, outputs, left_after: step + stay, final_state: vec![] });
                println!("step {step:2}: sequence {id} joins slot {slot} with {len} prompt tokens");
            }
        }
        if active.is_empty() {
            continue;
        }
        // One decode step for every active sequence: a token each, states in the pool.
        seed += 1;
        let batch = draw(&rule, active.len(), 1, seed);
        let slots: Vec<i64> = active.iter().map(|s| s.slot as i64).collect();
        let o = decoder.decode(&views(&batch)?, &mut pool, &slots)?;
        for (n, s) in active.iter_mut().enumerate() {
            for (name, t) in &batch {
                let mut one = rows(t, 0, n..n + 1);
                one.shape[0] = 1;
                append(s.tokens.get_mut(name).expect("every sequence has every input"), &one);
            }
            s.outputs.extend_from_slice(&rows(&o, 0, n..n + 1).data);
        }
    }
    for mut s in active {
        s.final_state = pool.state("h", s.slot)?.to_vec();
        done.push(s);
    }
    if !waiting.is_empty() || done.len() != arrivals.len() {
        return Err(Error::Internal(format!("{} sequences never got a slot", arrivals.len() - done.len())));
    }

    // Every sequence, alone, in one dense forward over all its tokens.
    let mut worst: f64 = 0.0;
    done.sort_by_key(|s| s.id);
    println!("\nsequence  tokens  err o    err hT");
    for s in &done {
        let alone = prefill.forward(&views(&s.tokens)?)?;
        let err_o = rel_rms(&s.outputs, &alone.o().data);
        let err_h = rel_rms(&s.final_state, &alone.ht().data);
        worst = worst.max(err_o).max(err_h);
        println!("{:>8}  {:>6}  {err_o:.1e}  {err_h:.1e}", s.id, s.tokens["q"].shape[1]);
    }
    if worst > TOLERANCE {
        return Err(Error::Internal(format!("the engine's outputs differ from single-sequence runs by {worst:.2e}")));
    }
    println!(
        "\nall {} sequences agree with their single-sequence runs (worst {worst:.1e} <= {TOLERANCE:.0e})",
        done.len()
    );
    Ok(())
}
