//! Duplicate groups: union-find over hit pairs.

/// Union-find with path halving and union by size.
pub(crate) struct Dsu {
    parent: Vec<usize>,
    size: Vec<usize>,
}

impl Dsu {
    pub(crate) fn new(n: usize) -> Self {
        Self {
            parent: (0..n).collect(),
            size: vec![1; n],
        }
    }

    /// Members of the set whose root is `root` (meaningful only for a root, as returned by `find`).
    pub(crate) fn size_of_root(&self, root: usize) -> usize {
        self.size[root]
    }

    pub(crate) fn find(&mut self, mut x: usize) -> usize {
        while self.parent[x] != x {
            self.parent[x] = self.parent[self.parent[x]];
            x = self.parent[x];
        }
        x
    }

    pub(crate) fn union(&mut self, a: usize, b: usize) {
        let (mut ra, mut rb) = (self.find(a), self.find(b));
        if ra == rb {
            return;
        }
        if self.size[ra] < self.size[rb] {
            std::mem::swap(&mut ra, &mut rb);
        }
        self.parent[rb] = ra;
        self.size[ra] += self.size[rb];
    }

    /// Groups of two or more members, members ascending, groups ordered by smallest member.
    pub(crate) fn groups(&mut self) -> Vec<Vec<usize>> {
        let n = self.parent.len();
        let mut slot = vec![usize::MAX; n];
        let mut out: Vec<Vec<usize>> = Vec::new();
        for i in 0..n {
            let r = self.find(i);
            if self.size[r] < 2 {
                continue;
            }
            if slot[r] == usize::MAX {
                slot[r] = out.len();
                out.push(Vec::with_capacity(self.size[r]));
            }
            out[slot[r]].push(i);
        }
        out
    }
}

/// Groups rows `0..n` connected by `pairs` into clusters; returns the clusters of two or more rows, each
/// sorted, ordered by their smallest row (deterministic whatever the order of `pairs`). Out-of-range rows and
/// self-pairs are ignored.
pub fn union_find(n: usize, pairs: &[(usize, usize)]) -> Vec<Vec<usize>> {
    let mut dsu = Dsu::new(n);
    for &(a, b) in pairs {
        if a < n && b < n && a != b {
            dsu.union(a, b);
        }
    }
    dsu.groups()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_merge_and_order_is_deterministic() {
        let a = union_find(10, &[(7, 3), (3, 9), (1, 2), (5, 5)]);
        assert_eq!(a, vec![vec![1, 2], vec![3, 7, 9]]);
        let b = union_find(10, &[(1, 2), (9, 3), (3, 7)]);
        assert_eq!(a, b);
        assert!(union_find(3, &[]).is_empty());
    }
}
