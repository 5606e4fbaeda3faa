//! Which store paths go into which layer.
//!
//! With room (`budget` layers for the store), every path has its own
//! layer. Without, a path's score is its NAR size times the number of
//! paths in the closure that need it (itself included): the large and the
//! widely shared keep their own layers, since those are what registries and
//! hosts reuse; the rest are merged into one layer. The top path, with the
//! small paths only it refers to (what changes with every build of it),
//! comes last either way. A path's own layer depends on nothing but the
//! path, so its digest is the same in every image that gives it one.

use crate::closure::PathInfo;

/// Paths only the top refers to, below this size, travel with the top.
const SMALL: u64 = 64 << 10;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    /// Indices into the closure's paths, sorted.
    pub paths: Vec<usize>,
    pub kind: GroupKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupKind {
    /// One path.
    Own,
    /// Paths that did not fit a layer each.
    Merged,
    /// The top path and the small paths only it refers to.
    Top,
}

/// How many paths (self included) reach each path.
fn users(paths: &[PathInfo]) -> Vec<u64> {
    let n = paths.len();
    let index = |p: &str| paths.binary_search_by(|x| x.path.as_str().cmp(p)).ok();
    let words = n.div_ceil(64);
    // reach[i]: the paths i reaches (itself included), as a bitset,
    // computed children first (store references have no cycles but
    // self-references).
    let mut reach: Vec<Option<Vec<u64>>> = vec![None; n];
    fn visit(
        i: usize,
        paths: &[PathInfo],
        index: &dyn Fn(&str) -> Option<usize>,
        reach: &mut Vec<Option<Vec<u64>>>,
        words: usize,
    ) {
        if reach[i].is_some() {
            return;
        }
        let mut bits = vec![0u64; words];
        bits[i / 64] |= 1 << (i % 64);
        // Mark before descending: a cycle (which Nix never makes) ends here.
        reach[i] = Some(bits.clone());
        for r in &paths[i].references {
            if let Some(j) = index(r).filter(|&j| j != i) {
                visit(j, paths, index, reach, words);
                if let Some(child) = &reach[j] {
                    for (b, c) in bits.iter_mut().zip(child) {
                        *b |= c;
                    }
                }
            }
        }
        reach[i] = Some(bits);
    }
    for i in 0..n {
        visit(i, paths, &index, &mut reach, words);
    }
    let mut users = vec![0u64; n];
    for bits in reach.iter().flatten() {
        for (w, &word) in bits.iter().enumerate() {
            let mut word = word;
            while word != 0 {
                let b = word.trailing_zeros() as usize;
                users[w * 64 + b] += 1;
                word &= word - 1;
            }
        }
    }
    users
}

/// Groups for at most `budget` layers (at least 1), top-path group last.
pub fn group(paths: &[PathInfo], top: &str, budget: usize) -> Vec<Group> {
    let budget = budget.max(1);
    let n = paths.len();
    let top_i = paths.iter().position(|p| p.path == top);
    let own = |i: usize| Group {
        paths: vec![i],
        kind: GroupKind::Own,
    };
    let users = users(paths);
    let score = |i: usize| u128::from(paths[i].nar_size) * u128::from(users[i]);
    // Highest score first; ties by path, so the order is the inputs'.
    let by_score = |v: &mut Vec<usize>| {
        v.sort_by(|&a, &b| {
            score(b)
                .cmp(&score(a))
                .then(paths[a].path.cmp(&paths[b].path))
        })
    };
    if n <= budget {
        let mut rest: Vec<usize> = (0..n).filter(|&i| Some(i) != top_i).collect();
        by_score(&mut rest);
        let mut out: Vec<Group> = rest.into_iter().map(own).collect();
        out.extend(top_i.map(|i| Group {
            paths: vec![i],
            kind: GroupKind::Top,
        }));
        return out;
    }
    if budget == 1 {
        return vec![Group {
            paths: (0..n).collect(),
            kind: GroupKind::Merged,
        }];
    }
    // The top, and the small paths only it needs (users == 2: itself and
    // the top, which refers to it directly).
    let mut top_group: Vec<usize> = Vec::new();
    if let Some(t) = top_i {
        top_group.push(t);
        for r in &paths[t].references {
            if let Ok(j) = paths.binary_search_by(|x| x.path.as_str().cmp(r)) {
                if j != t && users[j] == 2 && paths[j].nar_size < SMALL {
                    top_group.push(j);
                }
            }
        }
        top_group.sort_unstable();
        top_group.dedup();
    }
    let mut rest: Vec<usize> = (0..n).filter(|i| !top_group.contains(i)).collect();
    by_score(&mut rest);
    // Layers left for the rest: one each if they fit, else all but one
    // own layers and one merged layer.
    let room = budget - usize::from(!top_group.is_empty());
    let mut out = Vec::new();
    if rest.len() <= room {
        out.extend(rest.into_iter().map(own));
    } else {
        let keep = room.saturating_sub(1);
        let mut merged = rest.split_off(keep);
        merged.sort_unstable();
        out.extend(rest.into_iter().map(own));
        out.push(Group {
            paths: merged,
            kind: GroupKind::Merged,
        });
    }
    if !top_group.is_empty() {
        out.push(Group {
            paths: top_group,
            kind: GroupKind::Top,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str, size: u64, refs: &[&str]) -> PathInfo {
        PathInfo {
            path: format!("/nix/store/{name}"),
            nar_hash: [0; 32],
            nar_size: size,
            references: refs.iter().map(|r| format!("/nix/store/{r}")).collect(),
            deriver: None,
        }
    }

    fn closure() -> Vec<PathInfo> {
        // top → app → {libc, big}; top → cfg (small, only top's); libc used by all.
        let mut v = vec![
            p("a-top", 100, &["b-app", "c-cfg", "d-libc"]),
            p("b-app", 5000, &["d-libc", "e-big"]),
            p("c-cfg", 10, &[]),
            p("d-libc", 2000, &["d-libc"]),
            p("e-big", 100_000, &[]),
            p("f-tiny", 1, &[]),
        ];
        v[0].references.insert("/nix/store/f-tiny".into());
        v
    }

    #[test]
    fn every_path_its_own_layer_when_there_is_room_top_last() {
        let c = closure();
        let g = group(&c, "/nix/store/a-top", 6);
        assert_eq!(g.len(), 6);
        assert_eq!(g.last().unwrap().paths, vec![0]);
        assert_eq!(g.last().unwrap().kind, GroupKind::Top);
        // e-big (100000 × 3 users) before d-libc (2000 × 3) before b-app.
        assert_eq!(g[0].paths, vec![4]);
        assert_eq!(g[1].paths, vec![1]);
    }

    #[test]
    fn without_room_small_and_rarely_used_paths_merge_and_the_budget_holds() {
        let c = closure();
        for budget in 1..=6 {
            let g = group(&c, "/nix/store/a-top", budget);
            assert!(g.len() <= budget, "{budget}: {g:?}");
            let mut all: Vec<usize> = g.iter().flat_map(|g| g.paths.clone()).collect();
            all.sort_unstable();
            assert_eq!(all, (0..c.len()).collect::<Vec<_>>(), "{budget}");
        }
        // The top with the small paths only it refers to (b-app, c-cfg,
        // f-tiny) last; the shared ones on their own, largest score first.
        let g = group(&c, "/nix/store/a-top", 4);
        assert_eq!(g.len(), 3);
        assert_eq!(g[0].paths, vec![4]);
        assert_eq!(g[1].paths, vec![3]);
        assert_eq!(g[2].paths, vec![0, 1, 2, 5]);
        assert_eq!(g[2].kind, GroupKind::Top);
        let g = group(&c, "/nix/store/a-top", 2);
        assert_eq!(g[0].kind, GroupKind::Merged);
        assert_eq!(g[0].paths, vec![3, 4]);
    }

    #[test]
    fn use_counts_include_every_path_that_reaches() {
        let c = closure();
        assert_eq!(users(&c), vec![1, 2, 2, 3, 3, 2]);
    }
}
