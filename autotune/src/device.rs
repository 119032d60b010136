//! The fingerprint a tuned schedule is kept under: the CPU's model and the SIMD level the
//! generated code calls. A schedule tuned on one machine says nothing about another, nor about
//! the same machine running with fewer vector instructions (`Simd` below the best).

use chunkc_codegen::cpu::Simd;

/// `"<CPU model> / <SIMD level>"`, e.g. `AMD EPYC 9R14 96-Core Processor / avx512`.
pub fn cpu() -> String {
    format!("{} / {}", cpu_model(), simd_name(Simd::best()))
}

fn simd_name(simd: Simd) -> &'static str {
    match simd {
        Simd::Portable => "portable",
        Simd::Avx2 => "avx2",
        Simd::Avx512 => "avx512",
    }
}

/// The model name the OS reports, or the architecture when it reports none.
fn cpu_model() -> String {
    let from_cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|text| {
        text.lines().find_map(|l| {
            l.strip_prefix("model name").and_then(|rest| rest.split_once(':')).map(|(_, m)| m.trim().to_string())
        })
    });
    from_cpuinfo.filter(|m| !m.is_empty()).unwrap_or_else(|| format!("unknown {} CPU", std::env::consts::ARCH))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_fingerprint_names_a_model_and_a_level() {
        let fp = super::cpu();
        let (model, level) = fp.rsplit_once(" / ").expect("model / level");
        assert!(!model.is_empty());
        assert!(["portable", "avx2", "avx512"].contains(&level), "{fp}");
    }
}
