//! `chunkc grad`: the gradient of the loss `L = sum(o * do) + sum(hT * dhT)` with respect to
//! every input of a rule and `h0`, from tensors by name.
//!
//! The backend today is the f64 reference differentiated in reverse mode
//! (`chunkc_dsl::gradient`): the truth the compiled backward programs are to be held to.

use crate::error::Error;
use crate::problem::{check_known_tensors, infer_dims};
use chunkc_dsl::ast::Rule;
use chunkc_dsl::gradient;
use chunkc_runtime::error::{expect_shape, RuntimeError};
use chunkc_runtime::io::Tensors;
use chunkc_runtime::tensor::Tensor;
use std::collections::BTreeMap;

/// The tensors `chunkc grad` takes besides the rule's inputs (the rule checker keeps inputs
/// from taking these names).
const STATE_AND_COTANGENTS: [&str; 3] = ["h0", "do", "dhT"];

/// Runs the rule forward and backward on `tensors` (the rule's inputs, optional `h0`, the
/// required `do` and optional `dhT`); returns `o`, `hT`, `d<input>` for every input (the
/// input's shape; a per-head parameter's summed over batch and time) and `dh0` when `h0` was
/// given. `source` names where the tensors came from, for messages. A tensor the rule does
/// not take is an error naming the ones it does, unless `allow_extra`.
pub fn grad(
    rule: &Rule,
    tensors: &Tensors,
    source: &str,
    scale: Option<f64>,
    allow_extra: bool,
) -> Result<BTreeMap<String, Tensor>, Error> {
    check_known_tensors(rule, tensors, source, "grad", &STATE_AND_COTANGENTS, allow_extra)?;
    let dims = infer_dims(rule, tensors, source)?;
    let d_o = tensors.get("do").ok_or_else(|| {
        Error::Runtime(RuntimeError::MissingTensor {
            name: "do".into(),
            path: source.to_string(),
            available: tensors.keys().cloned().collect(),
        })
    })?;
    expect_shape("do", d_o, &dims.output_shape(), "[B, T, H, V]")?;
    let d_ht = tensors.get("dhT");
    if let Some(d) = d_ht {
        expect_shape("dhT", d, &dims.state_shape(), "[B, H, K, V]")?;
    }
    let f64s = |t: &Tensor| t.data.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let h0 = tensors.get("h0").map(f64s);
    let d_ht = d_ht.map(f64s);
    let scale = scale.unwrap_or(1.0 / (dims.k as f64).sqrt());
    let g = gradient::grad(
        rule,
        dims,
        scale,
        &|name| tensors.get(name).map(f64s),
        h0.as_deref(),
        &f64s(d_o),
        d_ht.as_deref(),
    )
    .map_err(Error::Internal)?;
    let f32s = |x: Vec<f64>| x.into_iter().map(|y| y as f32).collect::<Vec<f32>>();
    let mut out = BTreeMap::new();
    out.insert("o".to_string(), Tensor::new(dims.output_shape(), f32s(g.outputs.o))?);
    out.insert("hT".to_string(), Tensor::new(dims.state_shape(), f32s(g.outputs.ht))?);
    for (inp, d) in rule.inputs.iter().zip(g.inputs) {
        out.insert(format!("d{}", inp.name), Tensor::new(dims.input_shape(inp), f32s(d))?);
    }
    if h0.is_some() {
        out.insert("dh0".to_string(), Tensor::new(dims.state_shape(), f32s(g.dh0))?);
    }
    Ok(out)
}
