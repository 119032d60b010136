//! Per-thread queues of `cp.async` copies and their commit groups.
//!
//! A copy reads its global source when it is issued (the kernel is not expected to write
//! the source while the copy is in flight; that is not checked) and lands in shared memory
//! only when a `cp.async.wait_group`/`wait_all` of the issuing thread covers its group:
//! until then [`super::shared::Shared`] marks its destination as pending.

/// The group of copies issued after the last `cp.async.commit_group`.
const UNCOMMITTED: u32 = u32::MAX;

#[derive(Clone, Debug)]
pub struct Copy {
    /// Destination offset in shared memory.
    pub dst: usize,
    pub data: [u8; 16],
    pub len: usize,
    group: u32,
}

impl Copy {
    pub fn new(dst: usize, data: [u8; 16], len: usize) -> Copy {
        Copy { dst, data, len, group: UNCOMMITTED }
    }
    pub fn bytes(&self) -> &[u8] {
        &self.data[..self.len]
    }
}

#[derive(Clone, Debug, Default)]
pub struct Queue {
    copies: Vec<Copy>,
    /// Groups committed so far (the next group's number).
    committed: u32,
}

impl Queue {
    pub fn issue(&mut self, c: Copy) {
        self.copies.push(c);
    }

    /// `cp.async.commit_group`: the uncommitted copies (possibly none: an empty group is
    /// legal and still counts) form the next group.
    pub fn commit(&mut self) {
        for c in &mut self.copies {
            if c.group == UNCOMMITTED {
                c.group = self.committed;
            }
        }
        self.committed += 1;
    }

    /// `cp.async.wait_group n` (all but the `n` most recent groups complete) or, with
    /// `all`, `cp.async.wait_all` (everything, uncommitted copies included). Returns the
    /// completed copies in issue order.
    pub fn wait(&mut self, n: u32, all: bool) -> Vec<Copy> {
        if self.copies.is_empty() {
            return Vec::new(); // the common case in a loop: no allocation
        }
        let limit = self.committed.saturating_sub(n);
        let (done, keep): (Vec<Copy>, Vec<Copy>) =
            self.copies.drain(..).partition(|c| all || (c.group != UNCOMMITTED && c.group < limit));
        self.copies = keep;
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dsts(v: &[Copy]) -> Vec<usize> {
        v.iter().map(|c| c.dst).collect()
    }

    #[test]
    fn wait_group_keeps_the_newest_groups_and_uncommitted_copies() {
        let mut q = Queue::default();
        q.issue(Copy::new(0, [0; 16], 4));
        q.commit(); // group 0
        q.commit(); // group 1, empty
        q.issue(Copy::new(16, [0; 16], 4));
        q.commit(); // group 2
        q.issue(Copy::new(32, [0; 16], 4)); // uncommitted
        assert_eq!(dsts(&q.wait(2, false)), [0]);
        assert!(q.wait(1, false).is_empty()); // group 1 is empty; group 2 is the newest
        assert_eq!(dsts(&q.wait(0, false)), [16]);
        assert!(q.wait(0, false).is_empty()); // uncommitted: not covered by wait_group
        assert_eq!(dsts(&q.wait(0, true)), [32]);
    }
}
