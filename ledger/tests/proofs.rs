//! Inclusion and consistency proofs for every tree size up to a few thousand,
//! from memory and from tiles written by the real writer.

use ed25519_dalek::SigningKey;
use proptest::prelude::*;
use troop_ledger::hash::{Hash, leaf_hash};
use troop_ledger::merkle::{
    HashReader, MemoryTree, consistency_proof, inclusion_proof, tree_hash, verify_consistency,
    verify_inclusion,
};
use troop_ledger::note::NoteSigner;
use troop_ledger::store::MemStore;
use troop_ledger::tile::TileHashReader;
use troop_ledger::writer::LogWriter;

const MAX: u64 = 2_100;

fn entry(i: u64) -> Vec<u8> {
    format!("entry {i}").into_bytes()
}

fn memory_tree() -> MemoryTree {
    let mut t = MemoryTree::default();
    for i in 0..MAX {
        t.push(leaf_hash(&entry(i)));
    }
    t
}

fn root_at(roots: &[Hash], n: u64) -> &Hash {
    &roots[usize::try_from(n).expect("small tree")]
}

fn flip(h: &Hash) -> Hash {
    let mut b = h.0;
    b[0] ^= 1;
    Hash(b)
}

#[test]
fn every_size_every_proof_shape() {
    let t = memory_tree();
    let roots: Vec<Hash> = (0..=MAX).map(|n| tree_hash(&t, n).expect("root")).collect();
    for n in 1..=MAX {
        // Indices and old sizes at the edges, where the recursion branches.
        let picks = [0, 1, n / 3, n / 2, n.saturating_sub(2), n - 1];
        for &i in picks.iter().filter(|&&i| i < n) {
            let proof = inclusion_proof(&t, i, n).expect("proof");
            let leaf = leaf_hash(&entry(i));
            verify_inclusion(&leaf, i, n, &proof, root_at(&roots, n)).expect("inclusion verifies");
            assert!(verify_inclusion(&flip(&leaf), i, n, &proof, root_at(&roots, n)).is_err());
            if !proof.is_empty() {
                let mut bad = proof.clone();
                bad.pop();
                assert!(verify_inclusion(&leaf, i, n, &bad, root_at(&roots, n)).is_err());
            }
        }
        for &m in picks
            .iter()
            .map(|p| p + 1)
            .collect::<Vec<_>>()
            .iter()
            .filter(|&&m| m <= n)
        {
            let proof = consistency_proof(&t, m, n).expect("proof");
            verify_consistency(m, root_at(&roots, m), n, root_at(&roots, n), &proof)
                .expect("consistency verifies");
            if m < n {
                assert!(
                    verify_consistency(m, &flip(root_at(&roots, m)), n, root_at(&roots, n), &proof)
                        .is_err()
                );
                assert!(
                    verify_consistency(m, root_at(&roots, m), n, &flip(root_at(&roots, n)), &proof)
                        .is_err()
                );
            }
        }
    }
}

/// Tiles written by the writer at many checkpoint sizes serve the same nodes,
/// roots and proofs as the in-memory tree.
#[test]
fn tiles_serve_the_same_proofs() {
    let t = memory_tree();
    let signer =
        NoteSigner::new("proofs.example/log", SigningKey::from_bytes(&[5; 32])).expect("signer");
    let mut w = LogWriter::open(MemStore::default(), signer).expect("open");
    let mut published = Vec::new();
    for i in 0..MAX {
        w.append(entry(i)).expect("append");
        if i % 97 == 0 || i == MAX - 1 {
            published.push(w.publish().expect("publish").clone());
        }
    }
    for cp in &published {
        assert_eq!(
            cp.root,
            tree_hash(&t, cp.size).expect("root"),
            "size {}",
            cp.size
        );
        let r = TileHashReader::new(w.store(), cp.size);
        assert_eq!(tree_hash(&r, cp.size).expect("tiles"), cp.root);
        for i in [0, cp.size / 2, cp.size - 1] {
            assert_eq!(
                inclusion_proof(&r, i, cp.size).expect("tiles"),
                inclusion_proof(&t, i, cp.size).expect("mem")
            );
        }
        for old in published.iter().filter(|o| o.size <= cp.size) {
            let from_tiles = consistency_proof(&r, old.size, cp.size).expect("tiles");
            assert_eq!(
                from_tiles,
                consistency_proof(&t, old.size, cp.size).expect("mem")
            );
            verify_consistency(old.size, &old.root, cp.size, &cp.root, &from_tiles)
                .expect("verifies");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn random_inclusion_and_consistency(n in 1..MAX, i_seed in 0..MAX, m_seed in 0..MAX) {
        let t = memory_tree();
        let i = i_seed % n;
        let m = 1 + m_seed % n;
        let root = tree_hash(&t, n).expect("root");
        let proof = inclusion_proof(&t, i, n).expect("proof");
        prop_assert!(verify_inclusion(&leaf_hash(&entry(i)), i, n, &proof, &root).is_ok());
        // A proof for one index never proves another.
        if n > 1 {
            let j = (i + 1) % n;
            prop_assert!(verify_inclusion(&leaf_hash(&entry(j)), i, n, &proof, &root).is_err());
        }
        let c = consistency_proof(&t, m, n).expect("proof");
        prop_assert!(verify_consistency(m, &tree_hash(&t, m).expect("old"), n, &root, &c).is_ok());
        prop_assert!(t.node(0, i).is_ok());
    }
}
