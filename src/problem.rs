//! Problem sizes from input tensors, and the shape check of every tensor a rule reads.

use crate::error::Error;
use chunkc_dsl::ast::{Rule, Ty};
use chunkc_dsl::reference::Dims;
use chunkc_runtime::error::RuntimeError;
use chunkc_runtime::io::Tensors;
use std::collections::BTreeMap;

/// Dimension names of an input's tensor, for messages.
pub fn dims_label(per_head: bool, ty: Ty) -> &'static str {
    match (per_head, ty) {
        (true, Ty::Scalar) => "[H]",
        (true, Ty::VecK) => "[H, K]",
        (true, _) => "[H, V]",
        (false, Ty::Scalar) => "[B, T, H]",
        (false, Ty::VecK) => "[B, T, H, K]",
        (false, _) => "[B, T, H, V]",
    }
}

/// Refuses a tensor that is neither an input of `rule` nor one of `also` (the state and
/// cotangent tensors the command takes): a misnamed `h0` (FLA's `initial_state`, say) would
/// otherwise be ignored and the run start from zeros without a word. One line, listing the
/// names the command takes; `allow_extra` lets the others through.
pub fn check_known_tensors(
    rule: &Rule,
    tensors: &Tensors,
    source: &str,
    command: &str,
    also: &[&str],
    allow_extra: bool,
) -> Result<(), Error> {
    if allow_extra {
        return Ok(());
    }
    // Each extra state's initial tensor, and for the gradient its final cotangent.
    let mut states: Vec<String> = rule.states.iter().map(|s| s.initial_name()).collect();
    if command == "grad" {
        states.extend(rule.states.iter().map(|s| format!("d{}", s.final_name())));
    }
    let known = |n: &str| rule.input(n).is_some() || also.contains(&n) || states.iter().any(|s| s == n);
    match tensors.keys().find(|n| !known(n)) {
        None => Ok(()),
        Some(extra) => {
            let mut takes: Vec<&str> = rule.inputs.iter().map(|i| i.name.as_str()).collect();
            takes.extend(also);
            takes.extend(states.iter().map(String::as_str));
            Err(Error::Input(format!(
                "tensor `{extra}` in {source} is not one rule `{}` takes for {command} (it takes: {}; --allow-extra ignores the others)",
                rule.name,
                takes.join(", ")
            )))
        }
    }
}

/// Reads B, T, H, K and V off the tensors, then checks every tensor the rule reads (and
/// `h0`, each extra state's `<name>0` and `d<name>T` when present) against them. `source` names where the tensors came from.
pub fn infer_dims(rule: &Rule, tensors: &Tensors, source: &str) -> Result<Dims, Error> {
    let shapes: BTreeMap<String, Vec<usize>> = tensors.iter().map(|(n, t)| (n.clone(), t.shape.clone())).collect();
    infer_dims_of_shapes(rule, &shapes, source)
}

/// [`infer_dims`] from the tensors' shapes alone (the library's borrowed tensors have no
/// [`chunkc_runtime::tensor::Tensor`]).
pub fn infer_dims_of_shapes(rule: &Rule, shapes: &BTreeMap<String, Vec<usize>>, source: &str) -> Result<Dims, Error> {
    let get = |name: &str| {
        shapes.get(name).ok_or_else(|| {
            Error::Runtime(RuntimeError::MissingTensor {
                name: name.to_string(),
                path: source.to_string(),
                available: shapes.keys().cloned().collect(),
            })
        })
    };
    let rank_error = |name: &str, label: &str, shape: &[usize]| {
        Error::Input(format!(
            "tensor `{name}`: expected {} dimensions {label}, got shape {shape:?}",
            label.split(',').count()
        ))
    };
    let (mut bth, mut heads, mut k, mut v) = (None, None, None, None);
    for inp in &rule.inputs {
        let shape = get(&inp.name)?;
        let label = dims_label(inp.per_head, inp.ty);
        let want_rank = label.split(',').count();
        if shape.len() != want_rank {
            return Err(rank_error(&inp.name, label, shape));
        }
        let width = match (inp.per_head, inp.ty) {
            (_, Ty::Scalar) => None,
            (true, _) => Some(shape[1]),
            (false, _) => Some(shape[3]),
        };
        if inp.per_head {
            heads.get_or_insert(shape[0]);
        } else {
            bth.get_or_insert((shape[0], shape[1], shape[2]));
        }
        match inp.ty {
            Ty::VecK => k = k.or(width),
            Ty::VecV => v = v.or(width),
            _ => {}
        }
    }
    let h0 = shapes.get("h0");
    if let Some(h0) = h0 {
        if h0.len() != 4 {
            return Err(rank_error("h0", "[B, H, K, V]", h0));
        }
        k = k.or(Some(h0[2]));
        v = v.or(Some(h0[3]));
    }
    let (batch, seq_len, h) = bth.ok_or_else(|| {
        Error::Input(format!("rule `{}` has no per-token input, so the sequence length is unknown", rule.name))
    })?;
    let heads = heads.unwrap_or(h);
    let k = k.ok_or_else(|| Error::Input("cannot tell K: the rule has no [K] input; pass h0 [B, H, K, V]".into()))?;
    let v = v.ok_or_else(|| Error::Input("cannot tell V: the rule has no [V] input; pass h0 [B, H, K, V]".into()))?;
    if k == 0 || v == 0 || heads == 0 {
        return Err(Error::Input(format!("K, V and H must be at least 1 (got K={k}, V={v}, H={heads})")));
    }
    let dims = Dims { batch, seq_len, heads, k, v };
    for inp in &rule.inputs {
        expect_shape(&inp.name, get(&inp.name)?, &dims.input_shape(inp), dims_label(inp.per_head, inp.ty))?;
    }
    if let Some(h0) = h0 {
        expect_shape("h0", h0, &dims.state_shape(), "[B, H, K, V]")?;
    }
    for s in &rule.states {
        let (label, want) = match s.ty {
            Ty::VecK => ("[B, H, K]", vec![batch, heads, k]),
            _ => ("[B, H, V]", vec![batch, heads, v]),
        };
        for name in [s.initial_name(), format!("d{}", s.final_name())] {
            if let Some(shape) = shapes.get(&name) {
                expect_shape(&name, shape, &want, label)?;
            }
        }
    }
    Ok(dims)
}

/// A shape mismatch as the runtime words it: the tensor, its dimension names, expected and
/// actual shape.
pub fn expect_shape(name: &str, got: &[usize], expected: &[usize], dims_label: &str) -> Result<(), Error> {
    if got == expected {
        return Ok(());
    }
    Err(Error::Runtime(RuntimeError::ShapeMismatch {
        name: name.to_string(),
        expected: expected.to_vec(),
        got: got.to_vec(),
        dims: dims_label.to_string(),
    }))
}
