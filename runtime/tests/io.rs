//! Tensors and safetensors I/O: round trips, the shared golden files, f16/bf16 conversion
//! and the exact text of every error a user can run into.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use chunkc_runtime::error::{expect_shape, RuntimeError};
use chunkc_runtime::io::{bf16_to_f32, f16_to_f32, get_tensor, read_safetensors, write_safetensors};
use chunkc_runtime::tensor::Tensor;
use safetensors::tensor::{Dtype, TensorView};

/// A fresh scratch directory for one test.
fn scratch(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("chunkc-runtime-io").join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes a safetensors file with raw tensors of any dtype, through the safetensors crate.
fn write_raw(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(&str, TensorView<'_>)> =
        tensors.iter().map(|(n, d, s, b)| (*n, TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn f32_tensors(names: &[&str]) -> BTreeMap<String, Tensor> {
    names.iter().map(|n| (n.to_string(), Tensor::zeros(vec![2, 3]))).collect()
}

#[test]
fn tensor_constructors() {
    let t = Tensor::new(vec![2, 3], (0..6).map(|i| i as f32).collect()).unwrap();
    assert_eq!(t.numel(), 6);
    assert_eq!(t.count_non_finite(), 0);
    let scalar = Tensor::new(vec![], vec![4.0]).unwrap();
    assert_eq!(scalar.numel(), 1);
    let empty = Tensor::new(vec![3, 0, 2], vec![]).unwrap();
    assert_eq!(empty.numel(), 0);

    let z = Tensor::zeros(vec![4, 5]);
    assert_eq!((z.shape.as_slice(), z.numel()), (&[4, 5][..], 20));
    assert!(z.data.iter().all(|&x| x == 0.0));

    let mut poisoned = Tensor::filled(vec![2, 2, 2], f32::NAN);
    assert_eq!(poisoned.count_non_finite(), 8);
    poisoned.data[..5].fill(1.0);
    poisoned.data[5] = f32::INFINITY;
    poisoned.data[6] = f32::NEG_INFINITY;
    assert_eq!(poisoned.count_non_finite(), 3);

    let err = Tensor::new(vec![2, 3], vec![0.0; 5]).unwrap_err();
    assert_eq!(err.to_string(), "tensor data has 5 elements but shape [2, 3] needs 6");
    let err = Tensor::new(vec![usize::MAX, 2], vec![]).unwrap_err();
    assert_eq!(err.to_string(), format!("shape [{}, 2] has more elements than this machine can address", usize::MAX));
}

#[test]
fn round_trip() {
    let dir = scratch("round_trip");
    let path = dir.join("out.safetensors");
    let mut tensors = BTreeMap::new();
    let specials =
        vec![0.0, -0.0, 1.5, -2.25e-38, 1e-45, f32::MAX, f32::MIN_POSITIVE, f32::INFINITY, f32::NEG_INFINITY];
    tensors.insert("specials".to_string(), Tensor::new(vec![specials.len()], specials).unwrap());
    tensors.insert(
        "q".to_string(),
        Tensor::new(vec![1, 3, 2, 4], (0..24).map(|i| i as f32 * 0.37 - 3.0).collect()).unwrap(),
    );
    tensors.insert("nan".to_string(), Tensor::filled(vec![2, 1], f32::NAN));
    tensors.insert("scalar".to_string(), Tensor::new(vec![], vec![7.0]).unwrap());
    tensors.insert("empty".to_string(), Tensor::new(vec![0, 4], vec![]).unwrap());
    let metadata: BTreeMap<String, String> =
        [("family", "gla"), ("scale", "0.25")].iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    write_safetensors(&path, &tensors, Some(metadata.clone())).unwrap();

    let (back, back_meta) = read_safetensors(&path).unwrap();
    assert_eq!(back_meta, metadata);
    assert_eq!(back.keys().collect::<Vec<_>>(), tensors.keys().collect::<Vec<_>>());
    for (name, t) in &tensors {
        let b = &back[name];
        assert_eq!(b.shape, t.shape, "{name}");
        let bits = |t: &Tensor| t.data.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(b), bits(t), "{name}: values must survive bit for bit");
    }

    // Without metadata; and the bytes on disk are F32 little-endian, readable by safetensors.
    write_safetensors(&path, &tensors, None).unwrap();
    let (_, no_meta) = read_safetensors(&path).unwrap();
    assert!(no_meta.is_empty());
    let bytes = std::fs::read(&path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let q = file.tensor("q").unwrap();
    assert_eq!(q.dtype(), Dtype::F32);
    assert_eq!(&q.data()[4..8], &(0.37f32 - 3.0).to_le_bytes());
}

#[test]
fn reads_f64_f16_bf16() {
    let dir = scratch("reads_f64_f16_bf16");
    let path = dir.join("mixed.safetensors");
    let f64s: Vec<u8> = [1.0f64, -2.5, 1e300, 0.1].iter().flat_map(|x| x.to_le_bytes()).collect();
    let f16s: Vec<u8> = [0x3c00u16, 0xc100, 0x7bff, 0x0001].iter().flat_map(|x| x.to_le_bytes()).collect();
    let bf16s: Vec<u8> = [0x3f80u16, 0xc020, 0x7f80, 0x0001].iter().flat_map(|x| x.to_le_bytes()).collect();
    write_raw(
        &path,
        &[
            ("a64", Dtype::F64, vec![2, 2], f64s),
            ("b16", Dtype::F16, vec![4], f16s),
            ("c_bf16", Dtype::BF16, vec![1, 4], bf16s),
        ],
    );
    let (t, _) = read_safetensors(&path).unwrap();
    assert_eq!(t["a64"].shape, vec![2, 2]);
    assert_eq!(t["a64"].data, vec![1.0, -2.5, f32::INFINITY, 0.1f32]);
    assert_eq!(t["b16"].data, vec![1.0, -2.5, 65504.0, 2f32.powi(-24)]);
    assert_eq!(t["c_bf16"].shape, vec![1, 4]);
    assert_eq!(t["c_bf16"].data, vec![1.0, -2.5, f32::INFINITY, 2f32.powi(-133)]);
}

#[test]
fn f16_known_values() {
    assert_eq!(f16_to_f32(0x3c00), 1.0);
    assert_eq!(f16_to_f32(0xc100), -2.5);
    assert_eq!(f16_to_f32(0x7bff), 65504.0); // largest finite
    assert_eq!(f16_to_f32(0xfbff), -65504.0);
    assert_eq!(f16_to_f32(0x0400), 2f32.powi(-14)); // smallest normal
    assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24)); // smallest subnormal
    assert_eq!(f16_to_f32(0x03ff), 1023.0 * 2f32.powi(-24)); // largest subnormal
    assert_eq!(f16_to_f32(0x8001), -(2f32.powi(-24)));
    assert_eq!(f16_to_f32(0x3555), 0.333_251_95); // 1/3 rounded to f16
    assert_eq!(f16_to_f32(0x0000).to_bits(), 0.0f32.to_bits());
    assert_eq!(f16_to_f32(0x8000).to_bits(), (-0.0f32).to_bits());
    assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
    assert_eq!(f16_to_f32(0xfc00), f32::NEG_INFINITY);
    assert!(f16_to_f32(0x7e00).is_nan());
    assert!(f16_to_f32(0x7c01).is_nan()); // signalling NaN stays NaN, not infinity
    assert!(f16_to_f32(0xfe00).is_nan());
}

#[test]
fn f16_every_value_matches_the_formula() {
    for h in 0..=u16::MAX {
        let sign = if h >> 15 == 1 { -1.0f64 } else { 1.0 };
        let exp = i32::from((h >> 10) & 0x1f);
        let mant = f64::from(h & 0x3ff);
        let got = f16_to_f32(h);
        match exp {
            0x1f if mant == 0.0 => assert_eq!(f64::from(got), sign * f64::INFINITY, "{h:#06x}"),
            0x1f => assert!(got.is_nan(), "{h:#06x}"),
            0 => assert_eq!(f64::from(got), sign * mant * 2f64.powi(-24), "{h:#06x}"),
            _ => assert_eq!(f64::from(got), sign * (1.0 + mant / 1024.0) * 2f64.powi(exp - 15), "{h:#06x}"),
        }
        assert_eq!(got.is_sign_negative(), h >> 15 == 1, "{h:#06x}");
    }
}

#[test]
fn bf16_known_values() {
    assert_eq!(bf16_to_f32(0x3f80), 1.0);
    assert_eq!(bf16_to_f32(0xc020), -2.5);
    assert_eq!(bf16_to_f32(0x477f), 65280.0); // 65504 is not a bf16; its nearest is 65536
    assert_eq!(bf16_to_f32(0x4780), 65536.0);
    assert_eq!(bf16_to_f32(0x7f7f), 3.389_531_4e38); // largest finite
    assert_eq!(bf16_to_f32(0x0080), f32::MIN_POSITIVE); // smallest normal
    assert_eq!(bf16_to_f32(0x0001), 2f32.powi(-133)); // smallest subnormal
    assert_eq!(bf16_to_f32(0x007f), 127.0 * 2f32.powi(-133)); // largest subnormal
    assert_eq!(bf16_to_f32(0x8000).to_bits(), (-0.0f32).to_bits());
    assert_eq!(bf16_to_f32(0x7f80), f32::INFINITY);
    assert_eq!(bf16_to_f32(0xff80), f32::NEG_INFINITY);
    assert!(bf16_to_f32(0x7fc0).is_nan());
    assert!(bf16_to_f32(0x7f81).is_nan());
    for b in 0..=u16::MAX {
        assert_eq!(bf16_to_f32(b).to_bits() >> 16, u32::from(b));
    }
}

// ---- the shared golden files -------------------------------------------------------------

/// `$CHUNKC_GOLDENS`, else `<workspace>/../shared/goldens`, else the copy in the workspace's
/// tests/goldens. A missing folder fails the test (a test that passes without its files says
/// nothing), unless `CHUNKC_SKIP_GOLDENS=1` asks for a loud skip (`.ci/run` refuses that
/// variable).
fn goldens_dir() -> Option<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let candidates = match std::env::var_os("CHUNKC_GOLDENS") {
        Some(dir) => vec![PathBuf::from(dir)],
        None => vec![workspace.join("../shared/goldens"), workspace.join("tests/goldens")],
    };
    if let Some(dir) = candidates.iter().find(|d| d.join("index.json").is_file()) {
        return Some(dir.clone());
    }
    let skip = std::env::var_os("CHUNKC_SKIP_GOLDENS").is_some_and(|v| v == "1");
    assert!(skip, "no golden files at {candidates:?} (set CHUNKC_GOLDENS, or CHUNKC_SKIP_GOLDENS=1 to skip)");
    eprintln!("SKIPPED (CHUNKC_SKIP_GOLDENS=1): no golden files at {candidates:?}");
    None
}

/// The shape FLA's layout gives tensor `name` of a case of `family`.
fn golden_shape(family: &str, name: &str, [b, t, h, k, v]: [usize; 5]) -> Option<(Vec<usize>, &'static str)> {
    Some(match name {
        "q" | "k" => (vec![b, t, h, k], "B, T, H, K"),
        "v" | "o" => (vec![b, t, h, v], "B, T, H, V"),
        "h0" | "hT" => (vec![b, h, k, v], "B, H, K, V"),
        "beta" if family == "dplr" => (vec![b, t, h, k], "B, T, H, K"),
        "g" | "beta" => (vec![b, t, h], "B, T, H"),
        "gk" | "w" | "alpha" => (vec![b, t, h, k], "B, T, H, K"),
        "u" => (vec![h, k], "H, K"),
        _ => return None,
    })
}

#[test]
fn reads_every_golden_file() {
    let Some(dir) = goldens_dir() else { return };
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("index.json")).unwrap()).unwrap();
    let entries = index.as_array().expect("index.json is a list");
    assert!(!entries.is_empty());

    // Every .safetensors file is in the index, and every index entry has its file.
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = entries.iter().map(|e| e["file"].as_str().unwrap().to_string()).collect();
    listed.sort();
    assert_eq!(on_disk, listed, "index.json and the directory disagree");

    let mut checked = 0;
    for entry in entries {
        let file = entry["file"].as_str().unwrap();
        let family = entry["family"].as_str().unwrap();
        let dim = |d: &str| -> usize {
            // Numbers are stored as strings ("37"); accept plain numbers too.
            match &entry[d] {
                serde_json::Value::String(s) => s.parse().unwrap(),
                v => v.as_u64().unwrap() as usize,
            }
        };
        let dims = [dim("B"), dim("T"), dim("H"), dim("K"), dim("V")];
        let (tensors, metadata) = read_safetensors(dir.join(file)).unwrap_or_else(|e| panic!("{e}"));

        let mut names: Vec<&str> = entry["tensors"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
        names.sort();
        assert_eq!(tensors.keys().map(String::as_str).collect::<Vec<_>>(), names, "{file}: tensor names");
        for name in ["q", "k", "v", "o"] {
            get_tensor(&tensors, name, file).unwrap();
        }
        for (name, t) in &tensors {
            let (shape, label) =
                golden_shape(family, name, dims).unwrap_or_else(|| panic!("{file}: unexpected tensor `{name}`"));
            expect_shape(name, t, &shape, label).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(t.count_non_finite(), 0, "{file}: `{name}` has non-finite values");
            checked += 1;
        }
        // The file's own metadata agrees with the index.
        for key in ["family", "B", "T", "H", "K", "V", "scale"] {
            let want = match &entry[key] {
                serde_json::Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            assert_eq!(metadata.get(key), Some(&want), "{file}: metadata `{key}`");
        }
    }
    assert!(checked >= 4 * entries.len());
}

// ---- errors: the exact text a user sees --------------------------------------------------

#[test]
fn error_missing_file() {
    let err = read_safetensors("inputs.safetensors").unwrap_err();
    assert!(matches!(err, RuntimeError::Read { .. }));
    assert_eq!(err.to_string(), "cannot read inputs.safetensors: No such file or directory (os error 2)");

    let dir = scratch("error_missing_file");
    let err = read_safetensors(&dir).unwrap_err();
    assert_eq!(err.to_string(), format!("cannot read {}: Is a directory (os error 21)", dir.display()));
}

#[test]
fn error_garbage_file() {
    let dir = scratch("error_garbage_file");
    let path = dir.join("garbage.safetensors");
    let shown = path.display();

    std::fs::write(&path, "this is not a tensor file at all\n").unwrap();
    let err = read_safetensors(&path).unwrap_err();
    assert!(matches!(err, RuntimeError::NotSafetensors { .. }));
    assert_eq!(err.to_string(), format!("{shown} is not a safetensors file: header too large"));

    std::fs::write(&path, b"").unwrap();
    let err = read_safetensors(&path).unwrap_err();
    assert_eq!(err.to_string(), format!("{shown} is not a safetensors file: header too small"));

    // A plausible header length, then bytes that are not JSON.
    let mut bytes = 16u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"not json at all!");
    std::fs::write(&path, &bytes).unwrap();
    let msg = read_safetensors(&path).unwrap_err().to_string();
    assert!(msg.starts_with(&format!("{shown} is not a safetensors file: invalid JSON in header: ")), "{msg}");
    assert!(!msg.contains('\n'), "{msg}");

    // A valid file cut short.
    let good = dir.join("good.safetensors");
    write_safetensors(&good, &f32_tensors(&["q"]), None).unwrap();
    let full = std::fs::read(&good).unwrap();
    std::fs::write(&path, &full[..full.len() - 4]).unwrap();
    let err = read_safetensors(&path).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{shown} is not a safetensors file: incomplete metadata, file not fully covered")
    );
}

#[test]
fn error_wrong_dtype() {
    let dir = scratch("error_wrong_dtype");
    let path = dir.join("ints.safetensors");
    write_raw(&path, &[("mask", Dtype::BOOL, vec![3], vec![0, 1, 1])]);
    let err = read_safetensors(&path).unwrap_err();
    assert!(matches!(err, RuntimeError::UnsupportedDtype { .. }));
    assert_eq!(
        err.to_string(),
        "tensor `mask` has dtype BOOL; chunkc reads F32, F64, F16 and BF16 (and I32, I64 for index tensors)"
    );
}

#[test]
fn integer_index_tensors_read_exactly_or_not_at_all() {
    let dir = scratch("integer_index_tensors");
    let path = dir.join("ints.safetensors");
    let i32s: Vec<u8> = [0i32, 5, 22, 16_777_216].iter().flat_map(|x| x.to_le_bytes()).collect();
    let i64s: Vec<u8> = [0i64, -3, 9].iter().flat_map(|x| x.to_le_bytes()).collect();
    write_raw(&path, &[("a", Dtype::I32, vec![4], i32s), ("b", Dtype::I64, vec![3], i64s)]);
    let (tensors, _) = read_safetensors(&path).unwrap();
    assert_eq!(tensors["a"].data, vec![0.0, 5.0, 22.0, 16_777_216.0]);
    assert_eq!(tensors["b"].data, vec![0.0, -3.0, 9.0]);
    let big: Vec<u8> = [16_777_217i64].iter().flat_map(|x| x.to_le_bytes()).collect();
    write_raw(&path, &[("cu_seqlens", Dtype::I64, vec![1], big)]);
    let err = read_safetensors(&path).unwrap_err();
    assert_eq!(
        err.to_string(),
        "integer tensor `cu_seqlens` holds 16777217, past 2^24, which chunkc's f32 tensors cannot hold exactly"
    );
}

#[test]
fn error_missing_tensor() {
    let tensors = f32_tensors(&["q", "k", "v"]);
    let err = get_tensor(&tensors, "beta", "inputs.safetensors").unwrap_err();
    assert!(matches!(err, RuntimeError::MissingTensor { .. }));
    assert_eq!(err.to_string(), "tensor `beta` is missing from inputs.safetensors (it has: k, q, v)");
    assert_eq!(get_tensor(&tensors, "q", "inputs.safetensors").unwrap().shape, vec![2, 3]);

    let err = get_tensor(&BTreeMap::new(), "q", "empty.safetensors").unwrap_err();
    assert_eq!(err.to_string(), "tensor `q` is missing from empty.safetensors (it has no tensors)");

    // The same through a file on disk.
    let dir = scratch("error_missing_tensor");
    let path = dir.join("inputs.safetensors");
    write_safetensors(&path, &tensors, None).unwrap();
    let (back, _) = read_safetensors(&path).unwrap();
    let err = get_tensor(&back, "beta", &path).unwrap_err();
    assert_eq!(err.to_string(), format!("tensor `beta` is missing from {} (it has: k, q, v)", path.display()));
}

#[test]
fn error_wrong_shape() {
    let k = Tensor::zeros(vec![1, 37, 2, 24]);
    let want = "tensor `k`: expected shape [1, 37, 2, 16] ([B, T, H, K]), got [1, 37, 2, 24]";
    assert_eq!(expect_shape("k", &k, &[1, 37, 2, 16], "B, T, H, K").unwrap_err().to_string(), want);
    assert_eq!(expect_shape("k", &k, &[1, 37, 2, 16], "[B, T, H, K]").unwrap_err().to_string(), want);
    let err = expect_shape("k", &k, &[1, 37, 2, 16], "").unwrap_err();
    assert!(matches!(err, RuntimeError::ShapeMismatch { .. }));
    assert_eq!(err.to_string(), "tensor `k`: expected shape [1, 37, 2, 16], got [1, 37, 2, 24]");
    let err = expect_shape("g", &Tensor::zeros(vec![1, 37, 2, 1]), &[1, 37, 2], "B, T, H").unwrap_err();
    assert_eq!(err.to_string(), "tensor `g`: expected shape [1, 37, 2] ([B, T, H]), got [1, 37, 2, 1]");
    expect_shape("k", &k, &[1, 37, 2, 24], "B, T, H, K").unwrap();
}

#[test]
fn error_write() {
    let dir = scratch("error_write");
    let path = dir.join("no-such-dir").join("out.safetensors");
    let err = write_safetensors(&path, &f32_tensors(&["o"]), None).unwrap_err();
    assert!(matches!(err, RuntimeError::Write { .. }));
    assert_eq!(err.to_string(), format!("cannot write {}: No such file or directory (os error 2)", path.display()));

    let path = dir.join("out.safetensors");
    let mut bad = f32_tensors(&["o"]);
    bad.get_mut("o").unwrap().data.pop();
    let err = write_safetensors(&path, &bad, None).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("cannot write {}: tensor `o`: tensor data has 5 elements but shape [2, 3] needs 6", path.display())
    );
    let err = write_safetensors(&path, &f32_tensors(&["__metadata__"]), None).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("cannot write {}: `__metadata__` is reserved and cannot name a tensor", path.display())
    );
}

#[test]
fn errors_are_one_line() {
    let errors = [
        RuntimeError::NotSafetensors { path: "x".into(), reason: "y".into() },
        RuntimeError::UnsupportedDtype { name: "q".into(), dtype: "I8".into() },
        RuntimeError::MissingTensor { name: "q".into(), path: "x".into(), available: vec!["k".into()] },
        RuntimeError::ShapeOverflow { shape: vec![usize::MAX, 2] },
    ];
    for e in errors {
        let boxed: Box<dyn std::error::Error> = Box::new(e);
        assert!(!boxed.to_string().contains('\n'));
    }
}

#[test]
fn corrupted_files_give_errors_not_panics() {
    let dir = scratch("corrupted_files");
    let good = dir.join("good.safetensors");
    let mut tensors = f32_tensors(&["k", "q"]);
    tensors.insert("s".to_string(), Tensor::new(vec![], vec![1.0]).unwrap());
    write_safetensors(&good, &tensors, Some([("B".to_string(), "1".to_string())].into())).unwrap();
    let full = std::fs::read(&good).unwrap();
    let header_end = 8 + u64::from_le_bytes(full[..8].try_into().unwrap()) as usize;
    let path = dir.join("bad.safetensors");
    let check = |bytes: &[u8]| {
        std::fs::write(&path, bytes).unwrap();
        let result = std::panic::catch_unwind(|| read_safetensors(&path));
        match result {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => assert!(!e.to_string().contains('\n'), "{e}"),
            Err(_) => panic!("read_safetensors panicked on {:?}", String::from_utf8_lossy(bytes)),
        }
    };
    for cut in 0..full.len() {
        check(&full[..cut]);
    }
    for i in 0..header_end {
        for byte in [b'0', b'9', b'"', b'{', b']', b',', b'-', 0xff, b'F', b'I'] {
            let mut bytes = full.clone();
            bytes[i] = byte;
            check(&bytes);
        }
    }
    // Header dtypes that exist in safetensors but that chunkc does not read, sub-byte ones included.
    for dtype in ["F4", "F6_E2M3", "F8_E4M3", "BOOL", "U64", "C64", "XYZ"] {
        let header = format!(r#"{{"t":{{"dtype":"{dtype}","shape":[2],"data_offsets":[0,8]}}}}"#);
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&[0u8; 8]);
        check(&bytes);
    }
}
