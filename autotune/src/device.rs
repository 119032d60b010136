//! The fingerprint a tuned schedule is kept under: the CPU's model and the SIMD level the
//! generated code calls. A schedule tuned on one machine says nothing about another, nor about
//! the same machine running with fewer vector instructions (a level below the best). The
//! level is the backend's to name (the tuner knows no backend); its evaluator passes it in.

/// `"<CPU model> / <SIMD level>"`, e.g. `AMD EPYC 9R14 96-Core Processor / avx512`.
pub fn cpu(simd_level: &str) -> String {
    format!("{} / {simd_level}", cpu_model())
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
        let fp = super::cpu("avx2");
        let (model, level) = fp.rsplit_once(" / ").expect("model / level");
        assert!(!model.is_empty());
        assert_eq!(level, "avx2", "{fp}");
    }
}
