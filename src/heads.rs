//! Grouped heads: more value heads than key heads (Gated DeltaNet's and KDA's `num_v_heads >
//! num_heads`). A per-token input with fewer heads than the value heads HV (q and k at H,
//! HV a multiple of H) is shared by a group of HV / H consecutive value heads, value head
//! `hv` reading head `hv / (HV / H)`, as FLA repeats them (`repeat_interleave`).
//!
//! Every backend runs this the same way: the grouped inputs are repeated across their group
//! before the run (a copy of those inputs, HV / H times), so the kernels see HV heads
//! everywhere, and their gradients are summed over the group after it. The state, `o` and
//! every other tensor are per value head.

use crate::error::Error;
use chunkc_dsl::ast::Rule;
use chunkc_runtime::io::Tensors;
use chunkc_runtime::tensor::Tensor;
use std::borrow::Cow;
use std::collections::BTreeMap;

/// The per-token inputs with fewer heads than the value heads, and how many they have.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Groups {
    pub value_heads: usize,
    /// (input, its heads), for the inputs that are shared by groups of value heads.
    pub grouped: Vec<(String, usize)>,
}

impl Groups {
    /// The grouping the tensors' shapes describe: value heads are the most heads a per-token
    /// input has; an input with fewer must divide them. Inputs of other ranks are left to
    /// the shape check.
    pub fn of(rule: &Rule, shapes: &BTreeMap<String, Vec<usize>>) -> Result<Groups, Error> {
        let per_token = |name: &str| rule.input(name).is_some_and(|i| !i.per_head);
        let heads: Vec<(&String, usize)> =
            shapes.iter().filter(|(n, s)| per_token(n) && s.len() >= 3).map(|(n, s)| (n, s[2])).collect();
        let value_heads = heads.iter().map(|(_, h)| *h).max().unwrap_or(0);
        let mut grouped = vec![];
        for (name, h) in heads {
            if h == value_heads {
                continue;
            }
            if h == 0 || value_heads % h != 0 {
                return Err(Error::Input(format!(
                    "tensor `{name}` has {h} heads; the value heads ({value_heads}, the most any input has) must be a multiple of them"
                )));
            }
            grouped.push((name.clone(), h));
        }
        Ok(Groups { value_heads, grouped })
    }

    /// The heads `name` has (the value heads unless it is grouped).
    fn heads_of(&self, name: &str) -> Option<usize> {
        self.grouped.iter().find(|(n, _)| n == name).map(|(_, h)| *h)
    }

    /// `data` of shape `shape` (`[B, T, H, ...]`), its heads repeated across their groups
    /// to the value heads, when `name` is grouped; None otherwise.
    pub fn expand(&self, name: &str, shape: &[usize], data: &[f32]) -> Option<(Vec<usize>, Vec<f32>)> {
        let heads = self.heads_of(name)?;
        let group = self.value_heads / heads;
        let row: usize = shape[3..].iter().product();
        let mut out = Vec::with_capacity(data.len() * group);
        for token in data.chunks(heads * row.max(1)) {
            for hv in 0..self.value_heads {
                let h = hv / group;
                out.extend_from_slice(&token[h * row..(h + 1) * row]);
            }
        }
        let mut expanded = shape.to_vec();
        expanded[2] = self.value_heads;
        Some((expanded, out))
    }

    /// The gradient `data` of grouped input `name` (per value head, `[B, T, HV, ...]`)
    /// summed over each group, back to the input's own heads; None when `name` is not
    /// grouped.
    pub fn reduce(&self, name: &str, shape: &[usize], data: &[f32]) -> Option<(Vec<usize>, Vec<f32>)> {
        let heads = self.heads_of(name)?;
        let group = self.value_heads / heads;
        let row: usize = shape[3..].iter().product();
        let mut out = vec![0f32; data.len() / group];
        for (token, sums) in data.chunks(self.value_heads * row.max(1)).zip(out.chunks_mut(heads * row.max(1))) {
            for hv in 0..self.value_heads {
                let h = hv / group;
                for (s, x) in sums[h * row..(h + 1) * row].iter_mut().zip(&token[hv * row..(hv + 1) * row]) {
                    *s += x;
                }
            }
        }
        let mut reduced = shape.to_vec();
        reduced[2] = heads;
        Some((reduced, out))
    }
}

/// `tensors` with every grouped input repeated to the value heads (borrowed when none is
/// grouped), and the grouping.
pub fn expand_tensors<'t>(rule: &Rule, tensors: &'t Tensors) -> Result<(Cow<'t, Tensors>, Groups), Error> {
    let shapes = tensors.iter().map(|(n, t)| (n.clone(), t.shape.clone())).collect();
    let groups = Groups::of(rule, &shapes)?;
    if groups.grouped.is_empty() {
        return Ok((Cow::Borrowed(tensors), groups));
    }
    let mut out = tensors.clone();
    for (name, t) in tensors {
        if let Some((shape, data)) = groups.expand(name, &t.shape, &t.data) {
            out.insert(name.clone(), Tensor::new(shape, data)?);
        }
    }
    Ok((Cow::Owned(out), groups))
}

/// Sums the gradient `d<input>` of every grouped input over its group, in place.
pub fn reduce_gradients(groups: &Groups, grads: &mut BTreeMap<String, Tensor>) -> Result<(), Error> {
    for (name, _) in &groups.grouped {
        let key = format!("d{name}");
        if let Some(t) = grads.get(&key) {
            if let Some((shape, data)) = groups.reduce(name, &t.shape, &t.data) {
                grads.insert(key, Tensor::new(shape, data)?);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_repeat_across_their_group_and_gradients_sum_back() {
        let groups = Groups { value_heads: 4, grouped: vec![("q".into(), 2)] };
        // [B=1, T=2, H=2, D=2]
        let q: Vec<f32> = (0..8).map(|x| x as f32).collect();
        let (shape, data) = groups.expand("q", &[1, 2, 2, 2], &q).unwrap();
        assert_eq!(shape, vec![1, 2, 4, 2]);
        assert_eq!(data, vec![0., 1., 0., 1., 2., 3., 2., 3., 4., 5., 4., 5., 6., 7., 6., 7.]);
        let (shape, sums) = groups.reduce("q", &shape, &data).unwrap();
        assert_eq!(shape, vec![1, 2, 2, 2]);
        assert_eq!(sums, q.iter().map(|x| 2.0 * x).collect::<Vec<_>>());
        assert!(groups.expand("v", &[1, 2, 4, 2], &[0.0; 16]).is_none());
    }
}
