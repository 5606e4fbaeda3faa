//! `Layout::place` and `fill`, and partition GUIDs by role and index, on
//! small ext4 plans (no image is written).

use super::*;
use formats::ext4::{Size, Slack};
use formats::tree::Tree;

fn ext4<'t>(tree: &'t Tree, label: &str, size: Size) -> Filesystem<'t> {
    let opts = ext4::Options::from_seed("test", label, size, false, 1);
    Filesystem::Ext4 {
        plan: ext4::plan(tree, &opts).unwrap(),
        uuid: seed::uuid("test", label),
    }
}

fn part<'t>(role: Role, name: &'static str, size: SizePolicy, fs: Filesystem<'t>) -> Partition<'t> {
    Partition {
        role,
        ty: PartType::Gpt(gpt::types::ROOT_X86_64),
        name: name.into(),
        label: name.into(),
        read_only: false,
        bootable: false,
        start: None,
        size,
        fs,
        guid: None,
    }
}

fn layout<'t>(partitions: Vec<Partition<'t>>) -> Layout<'t> {
    Layout {
        table: Table::Gpt,
        sector_size: 512,
        seed: "seed".into(),
        partitions,
        disk_size: None,
        iso: None,
    }
}

#[test]
fn place_aligns_each_partition_after_the_last_and_keeps_a_mib_for_the_backup() {
    let t = Tree::new(0o755);
    let auto = Size::Auto {
        slack: Slack::bytes(0),
    };
    let l = layout(vec![
        part(Role::Root, "a", SizePolicy::Content, ext4(&t, "a", auto)),
        part(
            Role::State,
            "b",
            SizePolicy::Fixed(8 << 20),
            ext4(&t, "b", Size::Fixed(8 << 20)),
        ),
    ]);
    let p = l.place().unwrap();
    assert_eq!(p.at[0].0, ALIGN, "the first MiB is the table's");
    assert_eq!(p.at[0].1 % ALIGN, 0);
    assert_eq!(p.at[1], (p.at[0].0 + p.at[0].1, 8 << 20));
    assert_eq!(p.size, p.at[1].0 + p.at[1].1 + ALIGN);
    // A filesystem larger than its fixed partition is refused.
    let big = layout(vec![part(
        Role::State,
        "b",
        SizePolicy::Fixed(4 << 20),
        ext4(&t, "b", Size::Fixed(8 << 20)),
    )]);
    assert!(big
        .place()
        .err()
        .unwrap()
        .to_string()
        .contains("does not fit"));
}

#[test]
fn fill_gives_the_last_partition_the_rest_and_refuses_a_disk_too_small() {
    let t = Tree::new(0o755);
    let auto = Size::Auto {
        slack: Slack::bytes(0),
    };
    let mut l = layout(vec![
        part(Role::Root, "a", SizePolicy::Content, ext4(&t, "a", auto)),
        part(
            Role::State,
            "b",
            SizePolicy::Fill,
            ext4(&t, "b", Size::Fixed(8 << 20)),
        ),
    ]);
    l.fill(256 << 20).unwrap();
    let p = l.place().unwrap();
    assert_eq!(p.size, 256 << 20);
    assert_eq!(
        p.at[1].0 + p.at[1].1,
        (256 << 20) - ALIGN,
        "up to the backup's MiB"
    );
    assert_eq!(
        l.partitions[1].fs.size(),
        p.at[1].1,
        "the filesystem re-planned to fill it"
    );
    let mut small = layout(vec![
        part(Role::Root, "a", SizePolicy::Content, ext4(&t, "a", auto)),
        part(
            Role::State,
            "b",
            SizePolicy::Fill,
            ext4(&t, "b", Size::Fixed(8 << 20)),
        ),
    ]);
    assert!(small.fill(4 << 20).is_err());
    assert!(small.fill((256 << 20) + 1).is_err(), "not whole sectors");
}

#[test]
fn partition_guids_come_from_role_and_index_never_from_the_name() {
    let t = Tree::new(0o755);
    let fixed = || Size::Fixed(8 << 20);
    // Two root slots with the same name, as A/B slots may be.
    let l = layout(vec![
        part(
            Role::Root,
            "slot",
            SizePolicy::Content,
            ext4(&t, "a", fixed()),
        ),
        part(
            Role::Root,
            "slot",
            SizePolicy::Content,
            ext4(&t, "b", fixed()),
        ),
        part(
            Role::State,
            "state",
            SizePolicy::Content,
            ext4(&t, "c", fixed()),
        ),
    ]);
    let g = l.place().unwrap().table.guids;
    assert_ne!(g[0], g[1]);
    // The first of each role keeps the GUID images have always had.
    assert_eq!(g[0], seed::format_uuid(&seed::uuid("seed", "gpt:nixos")));
    assert_eq!(g[1], seed::format_uuid(&seed::uuid("seed", "gpt:nixos:1")));
    assert_eq!(g[2], seed::format_uuid(&seed::uuid("seed", "gpt:state")));
}
