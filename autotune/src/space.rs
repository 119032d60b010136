//! The candidates the search tries for one problem, stage by stage.
//!
//! A full grid over kernel × chunk × program × time block × V-tile is about 300 points, each
//! compiled, verified and timed; the parameters interact little (the chunk sets the work, the
//! program and the V-tile the parallelism, the time block the cache reuse of input pages), so
//! the search varies one at a time, each stage starting from the previous stage's winner
//! (coordinate descent): about a dozen points.

use crate::{KernelKind, ProgramShape, Schedule};

/// What the space depends on.
#[derive(Clone, Copy, Debug)]
pub struct Problem {
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Value width (the V-tiles must divide it).
    pub v: usize,
    /// Whether the rule has a chunked kernel (linear in the state).
    pub chunkable: bool,
}

/// Which parameter a stage varies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// The kernel and its chunk size.
    Kernel,
    /// The chunked program: fused, or split (a state pass between chunk-parallel passes,
    /// which spread the chunks over the workers when there are fewer grid points than them).
    Program,
    /// The executor's time block.
    TimeBlock,
    /// The V-tile of the grid.
    VTile,
}

impl Stage {
    pub const ALL: [Stage; 4] = [Stage::Kernel, Stage::Program, Stage::TimeBlock, Stage::VTile];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Kernel => "kernel",
            Stage::Program => "program",
            Stage::TimeBlock => "time block",
            Stage::VTile => "V tile",
        }
    }
}

/// The values each stage tries.
#[derive(Clone, Debug)]
pub struct Space {
    pub problem: Problem,
    pub chunks: Vec<usize>,
    pub time_blocks: Vec<usize>,
    /// V-tile widths besides the whole V.
    pub bvs: Vec<usize>,
}

/// Chunk sizes tried: the tile matmuls' sizes (multiples of 16), from where the intra-chunk
/// work is small to where it dominates.
const CHUNKS: [usize; 4] = [16, 32, 64, 128];
/// Time blocks tried (tokens); 0 is head by head.
const TIME_BLOCKS: [usize; 6] = [0, 64, 128, 256, 512, 1024];
/// The narrowest V-tile tried: below it a tile's rows no longer fill the SIMD routines' 16 lanes.
const MIN_BV: usize = 16;

impl Space {
    pub fn new(problem: Problem) -> Space {
        let mut bvs = vec![];
        let mut bv = problem.v / 2;
        while bv >= MIN_BV && problem.v.is_multiple_of(bv) {
            bvs.push(bv);
            bv /= 2;
        }
        let chunks = if problem.chunkable { CHUNKS.to_vec() } else { vec![] };
        Space { problem, chunks, time_blocks: TIME_BLOCKS.to_vec(), bvs }
    }

    /// The configurations stage `stage` tries from `incumbent`, the incumbent first: each
    /// differs from it in the stage's parameter only.
    pub fn candidates(&self, stage: Stage, incumbent: Schedule) -> Vec<Schedule> {
        let mut out = vec![incumbent];
        let mut push = |c: Schedule| {
            if !out.contains(&c) {
                out.push(c);
            }
        };
        let seq_len = self.problem.seq_len;
        match stage {
            Stage::Kernel => {
                push(incumbent.with_kernel(KernelKind::Recurrent, 0));
                // A chunk longer than the sequence is one partial chunk: the same work as
                // the smallest chunk that covers it, so only chunks up to that one are tried.
                let cover = self.chunks.iter().copied().find(|&c| c >= seq_len);
                for &c in self.chunks.iter().filter(|&&c| c < seq_len || Some(c) == cover) {
                    push(incumbent.with_kernel(KernelKind::Chunked, c));
                }
            }
            Stage::Program => {
                if incumbent.kernel == KernelKind::Chunked {
                    for program in [ProgramShape::Fused, ProgramShape::Split] {
                        push(incumbent.with_program(program));
                    }
                }
            }
            Stage::TimeBlock => {
                // The executor blocks only when the sequence is longer than a block, in whole
                // steps of the kernel's loop: blocks shorter than a step or not shorter than
                // the sequence are the same schedule as another candidate.
                for &tb in &self.time_blocks {
                    if tb == 0 || (tb >= incumbent.tokens_per_step() && tb < seq_len) {
                        push(incumbent.with_time_block(tb));
                    }
                }
            }
            Stage::VTile => {
                push(incumbent.with_bv(None));
                for &bv in &self.bvs {
                    push(incumbent.with_bv(Some(bv)));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chunked kernel at `chunk` with time block `tb` and V-tile `bv`.
    fn chunked(chunk: usize, tb: usize, bv: Option<usize>) -> Schedule {
        Schedule::chunked(chunk).with_time_block(tb).with_bv(bv)
    }

    /// The recurrent kernel with time block `tb` and V-tile `bv`.
    fn recurrent(tb: usize, bv: Option<usize>) -> Schedule {
        Schedule::recurrent().with_time_block(tb).with_bv(bv)
    }

    fn space(seq_len: usize, v: usize, chunkable: bool) -> Space {
        Space::new(Problem { seq_len, v, chunkable })
    }

    #[test]
    fn the_kernel_stage_tries_recurrent_and_every_chunk_below_the_sequence() {
        let s = space(2048, 128, true);
        let c = s.candidates(Stage::Kernel, chunked(64, 256, None));
        let names: Vec<String> = c.iter().map(|c| c.to_string()).collect();
        assert_eq!(
            names,
            [
                "chunked C=64 time-block=256 bv=V",
                "recurrent time-block=256 bv=V",
                "chunked C=16 time-block=256 bv=V",
                "chunked C=32 time-block=256 bv=V",
                "chunked C=128 time-block=256 bv=V",
            ]
        );
        // A 40-token sequence: 64 covers it, 128 is the same one partial chunk.
        let c = space(40, 128, true).candidates(Stage::Kernel, chunked(16, 0, None));
        let chunks: Vec<usize> = c.iter().map(|c| c.chunk).collect();
        assert_eq!(chunks, [16, 0, 32, 64]);
    }

    #[test]
    fn a_rule_without_a_chunked_kernel_tries_only_the_recurrent_one() {
        let c = space(2048, 128, false).candidates(Stage::Kernel, recurrent(256, None));
        assert_eq!(c, [recurrent(256, None)]);
    }

    #[test]
    fn the_program_stage_races_fused_and_split_for_the_chunked_kernel_only() {
        let s = space(2048, 128, true);
        let c = s.candidates(Stage::Program, chunked(32, 256, None));
        let programs: Vec<ProgramShape> = c.iter().map(|c| c.program).collect();
        assert_eq!(programs, [ProgramShape::Fused, ProgramShape::Split]);
        assert_eq!(s.candidates(Stage::Program, recurrent(256, None)), [recurrent(256, None)]);
    }

    #[test]
    fn time_blocks_are_whole_steps_shorter_than_the_sequence() {
        let s = space(300, 64, true);
        let c = s.candidates(Stage::TimeBlock, chunked(128, 256, None));
        let tbs: Vec<usize> = c.iter().map(|c| c.time_block).collect();
        assert_eq!(tbs, [256, 0, 128]);
        let c = s.candidates(Stage::TimeBlock, recurrent(0, None));
        let tbs: Vec<usize> = c.iter().map(|c| c.time_block).collect();
        assert_eq!(tbs, [0, 64, 128, 256]);
    }

    #[test]
    fn v_tiles_halve_while_they_divide_v_and_keep_sixteen_lanes() {
        assert_eq!(space(100, 128, true).bvs, [64, 32, 16]);
        assert_eq!(space(100, 40, true).bvs, [20]);
        assert!(space(100, 24, true).bvs.is_empty());
        let c = space(100, 128, true).candidates(Stage::VTile, chunked(32, 0, Some(32)));
        let bvs: Vec<Option<usize>> = c.iter().map(|c| c.bv).collect();
        assert_eq!(bvs, [Some(32), None, Some(64), Some(16)]);
    }
}
