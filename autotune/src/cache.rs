//! The file of tuned schedules: one `[[entry]]` per (device, rule, shape, threads), in TOML so
//! that a person can read, edit or delete an entry.
//!
//! An entry also records a hash of the rule file's text: editing the rule makes its entries
//! stale (found, but not used) rather than silently applied to a different kernel.

use crate::{KernelKind, ProgramShape, Schedule};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};

/// What an entry is looked up by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Key {
    /// [`crate::device::cpu`].
    pub device: String,
    pub rule: String,
    /// [`rule_hash`] of the rule file's text.
    pub rule_hash: String,
    /// B, T, H, K, V.
    pub shape: [usize; 5],
    pub threads: usize,
}

/// One tuned schedule and what it was measured at.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub device: String,
    pub rule: String,
    pub rule_hash: String,
    pub shape: [usize; 5],
    pub threads: usize,
    pub kernel: KernelKind,
    /// 0 for the recurrent kernel.
    #[serde(default)]
    pub chunk: usize,
    pub time_block: usize,
    /// Absent: the whole V.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bv: Option<usize>,
    /// The chunked program (absent: fused, as in caches written before programs existed).
    #[serde(default)]
    pub program: ProgramShape,
    /// The winner's best run in its last race.
    pub best_ms: f64,
    /// The default schedule's best run in the same race (absent when the default won).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_best_ms: Option<f64>,
    /// When it was tuned, seconds since 1970.
    pub tuned_unix: u64,
}

impl Entry {
    pub fn key(&self) -> Key {
        Key {
            device: self.device.clone(),
            rule: self.rule.clone(),
            rule_hash: self.rule_hash.clone(),
            shape: self.shape,
            threads: self.threads,
        }
    }

    /// The tuned schedule.
    pub fn schedule(&self) -> Schedule {
        let base = match self.kernel {
            KernelKind::Chunked => Schedule::chunked(self.chunk),
            KernelKind::Recurrent => Schedule::recurrent(),
        };
        base.with_time_block(self.time_block).with_bv(self.bv).with_program(self.program)
    }
}

/// What a lookup found.
#[derive(Debug, PartialEq)]
pub enum Lookup<'a> {
    Found(&'a Entry),
    /// No entry for this exact shape, but one in its bucket ([`same_bucket`]), the nearest.
    Near(&'a Entry),
    /// An entry for this device, rule name, shape and threads, tuned for other rule text.
    Stale(&'a Entry),
    Missing,
}

#[derive(Serialize, Deserialize, Default)]
struct File {
    #[serde(default)]
    entry: Vec<Entry>,
}

/// Whether a schedule tuned at shape `a` ([B, T, H, K, V]) stands for shape `b`: the same K
/// and V (the kernels' tiles are specialised to them, and a V-tile must divide V), T within a
/// factor of 2 (the chunk count and the time blocks scale with it) and B x H, the sequences
/// the threads share, within a factor of 2.
pub fn same_bucket(a: [usize; 5], b: [usize; 5]) -> bool {
    let within_2x = |x: usize, y: usize| x.max(1) <= 2 * y.max(1) && y.max(1) <= 2 * x.max(1);
    a[3] == b[3] && a[4] == b[4] && within_2x(a[1], b[1]) && within_2x(a[0] * a[2], b[0] * b[2])
}

/// How far apart two shapes of one bucket are: |log2| of the T ratio plus that of the B x H
/// ratio.
fn bucket_distance(a: [usize; 5], b: [usize; 5]) -> f64 {
    let log_ratio = |x: usize, y: usize| ((x.max(1) as f64) / (y.max(1) as f64)).log2().abs();
    log_ratio(a[1], b[1]) + log_ratio(a[0] * a[2], b[0] * b[2])
}

/// The entries of one cache file.
#[derive(Debug)]
pub struct Cache {
    path: PathBuf,
    entries: Vec<Entry>,
}

/// Reading or writing the cache file failed; the message names the file.
#[derive(Debug)]
pub struct CacheError(pub String);

impl fmt::Display for CacheError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CacheError {}

const HEADER: &str = "# chunkc tune: the fastest verified schedule per (device, rule, shape, threads).\n\
                      # Written by `chunkc tune`; read by `--tuned`. Delete an entry to forget it.\n\n";

impl Cache {
    /// Reads `path`; a file that does not exist is an empty cache.
    pub fn open(path: &Path) -> Result<Cache, CacheError> {
        let shown = path.display();
        let entries = match std::fs::read_to_string(path) {
            Ok(text) => {
                toml::from_str::<File>(&text)
                    .map_err(|e| CacheError(format!("{shown}: {}", e.to_string().trim_end())))?
                    .entry
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
            Err(e) => return Err(CacheError(format!("{shown}: cannot read the tuning cache: {e}"))),
        };
        Ok(Cache { path: path.to_path_buf(), entries })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The entry for `key`'s exact shape; else the nearest current one in its shape's bucket
    /// ([`same_bucket`]); else a stale exact one (tuned for other rule text), or nothing.
    pub fn lookup(&self, key: &Key) -> Lookup<'_> {
        let same_problem = |e: &&Entry| {
            e.device == key.device && e.rule == key.rule && e.shape == key.shape && e.threads == key.threads
        };
        let mut matching = self.entries.iter().filter(same_problem);
        let first = matching.clone().next();
        if let Some(e) = matching.find(|e| e.rule_hash == key.rule_hash) {
            return Lookup::Found(e);
        }
        let near = self
            .entries
            .iter()
            .filter(|e| {
                e.device == key.device
                    && e.rule == key.rule
                    && e.rule_hash == key.rule_hash
                    && e.threads == key.threads
                    && same_bucket(e.shape, key.shape)
            })
            .min_by(|a, b| bucket_distance(a.shape, key.shape).total_cmp(&bucket_distance(b.shape, key.shape)));
        match (near, first) {
            (Some(e), _) => Lookup::Near(e),
            (None, Some(e)) => Lookup::Stale(e),
            (None, None) => Lookup::Missing,
        }
    }

    /// Adds `entry`, replacing any entry for the same device, rule name, shape and threads
    /// (a stale one included).
    pub fn insert(&mut self, entry: Entry) {
        let k = entry.key();
        self.entries
            .retain(|e| !(e.device == k.device && e.rule == k.rule && e.shape == k.shape && e.threads == k.threads));
        self.entries.push(entry);
    }

    /// Writes the file (through a temporary file and a rename, so that a reader never sees
    /// half of it), creating its folder.
    pub fn save(&self) -> Result<(), CacheError> {
        let shown = self.path.display();
        let text = toml::to_string(&File { entry: self.entries.clone() })
            .map_err(|e| CacheError(format!("{shown}: cannot encode the tuning cache: {e}")))?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| CacheError(format!("{}: cannot create: {e}", dir.display())))?;
        }
        let tmp = self.path.with_extension("toml.tmp");
        std::fs::write(&tmp, format!("{HEADER}{text}"))
            .and_then(|_| std::fs::rename(&tmp, &self.path))
            .map_err(|e| CacheError(format!("{shown}: cannot write the tuning cache: {e}")))
    }
}

/// Where the cache lives unless a command names a file: `$CHUNKC_TUNE_CACHE`, else
/// `$XDG_CACHE_HOME/chunkc/tune.toml`, else `$HOME/.cache/chunkc/tune.toml`.
pub fn default_path() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("CHUNKC_TUNE_CACHE")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("chunkc").join("tune.toml")))
        .or_else(|| var("HOME").map(|d| d.join(".cache").join("chunkc").join("tune.toml")))
}

/// A 64-bit FNV-1a hash of a rule file's text, as 16 hex digits.
pub fn rule_hash(source: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in source.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chunked kernel at `chunk` with time block `tb` and V-tile `bv`.
    fn chunked(chunk: usize, tb: usize, bv: Option<usize>) -> Schedule {
        Schedule::chunked(chunk).with_time_block(tb).with_bv(bv)
    }

    fn entry(rule_hash: &str, chunk: usize) -> Entry {
        Entry {
            device: "cpu / avx512".into(),
            rule: "gla".into(),
            rule_hash: rule_hash.into(),
            shape: [1, 2048, 8, 128, 128],
            threads: 1,
            kernel: KernelKind::Chunked,
            chunk,
            time_block: 256,
            bv: None,
            program: ProgramShape::Fused,
            best_ms: 30.5,
            default_best_ms: Some(33.0),
            tuned_unix: 1_790_000_000,
        }
    }

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("chunkc-autotune-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir.join("sub").join("tune.toml")
    }

    #[test]
    fn entries_round_trip_through_the_file() {
        let path = temp("round-trip");
        let mut cache = Cache::open(&path).unwrap();
        assert!(cache.entries().is_empty());
        cache.insert(entry("aa", 32));
        cache.insert(Entry { bv: Some(64), threads: 2, default_best_ms: None, ..entry("aa", 16) });
        cache.save().unwrap();
        let back = Cache::open(&path).unwrap();
        assert_eq!(back.entries(), cache.entries());
        assert_eq!(back.entries()[1].schedule(), chunked(16, 256, Some(64)));
        assert!(std::fs::read_to_string(&path).unwrap().starts_with("# chunkc tune"));
    }

    #[test]
    fn a_lookup_finds_its_entry_and_calls_other_rule_text_stale() {
        let mut cache = Cache { path: PathBuf::from("unused"), entries: vec![] };
        let key = entry("aa", 32).key();
        assert_eq!(cache.lookup(&key), Lookup::Missing);
        cache.insert(entry("bb", 64));
        assert!(matches!(cache.lookup(&key), Lookup::Stale(e) if e.chunk == 64));
        // Retuning replaces the stale entry.
        cache.insert(entry("aa", 32));
        assert_eq!(cache.entries().len(), 1);
        assert!(matches!(cache.lookup(&key), Lookup::Found(e) if e.chunk == 32));
        let other_threads = Key { threads: 2, ..key };
        assert_eq!(cache.lookup(&other_threads), Lookup::Missing);
    }

    #[test]
    fn a_shape_without_an_entry_takes_the_nearest_in_its_bucket() {
        let mut cache = Cache { path: PathBuf::from("unused"), entries: vec![] };
        cache.insert(entry("aa", 32)); // B1 T2048 H8
        cache.insert(Entry { shape: [1, 4096, 8, 128, 128], ..entry("aa", 64) });
        cache.insert(Entry { shape: [1, 1024, 8, 128, 128], ..entry("bb", 16) }); // other rule text
        let key = |shape| Key { shape, ..entry("aa", 0).key() };
        // T 3000 is within 2x of both: log2(3000/2048) = 0.55, log2(4096/3000) = 0.45, so
        // 4096's entry; T 2500 is nearer 2048.
        assert!(matches!(cache.lookup(&key([1, 3000, 8, 128, 128])), Lookup::Near(e) if e.chunk == 64));
        assert!(matches!(cache.lookup(&key([1, 2500, 8, 128, 128])), Lookup::Near(e) if e.chunk == 32));
        // B x H 16 against 8: in the bucket; 32 against 8: not.
        assert!(matches!(cache.lookup(&key([2, 2048, 8, 128, 128])), Lookup::Near(e) if e.chunk == 32));
        assert_eq!(cache.lookup(&key([4, 2048, 8, 128, 128])), Lookup::Missing);
        // Another K or V, or T past 2x: no entry stands for it; other rule text never does.
        assert_eq!(cache.lookup(&key([1, 2048, 8, 64, 128])), Lookup::Missing);
        assert_eq!(cache.lookup(&key([1, 512, 8, 128, 128])), Lookup::Missing);
        assert!(matches!(cache.lookup(&key([1, 1024, 8, 128, 128])), Lookup::Near(e) if e.chunk == 32));
        // The exact shape wins over any near one.
        assert!(matches!(cache.lookup(&key([1, 4096, 8, 128, 128])), Lookup::Found(e) if e.chunk == 64));
    }

    #[test]
    fn a_corrupt_file_is_an_error_naming_it_and_the_line() {
        let path = temp("corrupt");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "[[entry]]\ndevice = \"x\"\nchunk = 32\n").unwrap();
        let err = Cache::open(&path).unwrap_err().to_string();
        assert!(err.starts_with(&path.display().to_string()), "{err}");
        assert!(err.contains("line"), "{err}");
    }

    #[test]
    fn the_rule_hash_changes_with_the_text() {
        assert_eq!(rule_hash(""), "cbf29ce484222325");
        assert_ne!(rule_hash("S = S + outer(k, v)"), rule_hash("S = S + outer(k, v) "));
    }
}
