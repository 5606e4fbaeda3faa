//! What one device gets besides the image (issue 17): its identity in the
//! state partition, and with `fill` the state partition grown to the
//! device's end. Led by the image's layout manifest: the state partition's
//! place, filesystem label and UUID, and where the identity goes.
//!
//! The state filesystem is compiled for the device by the ext4 writer,
//! identity inside, at the partition's new size (no resize2fs, no
//! first-boot growing); the partition table is rewritten (GPT entry and
//! both headers with the backup at the device's end; or the MBR entry).
//! The writer skips the image's own state partition for this device and
//! writes this instead, then verifies it against these bytes.
//!
//! Its journal is lazy ([`ext4::Journal::Lazy`]): only the journal's
//! superblock is written, with a first sequence number from the OS's
//! randomness, and the journal's body (256 MiB on a 32 GiB card) keeps
//! the card's old bytes, neither written nor verified. That is how
//! e2fsck resets a journal; a test replays a crashed log over a stale
//! journal left by the same image flashed before.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::sync::Arc;

use formats::ext4::{self, Size};
use formats::identity::{self, Generate, HostKey, MachineId};
use formats::sink::{Extents, Piece};
use formats::tree::{Tree, ROOT};

const MIB: u64 = 1 << 20;
/// The largest piece written or verified at once (the writer's chunk).
const PIECE: usize = 4 << 20;

/// The state partition as the manifest describes it.
#[derive(Clone, Debug)]
pub struct StatePart {
    /// Index into the table's entries (0-based).
    pub index: usize,
    pub offset: u64,
    pub size: u64,
    pub label: String,
    pub uuid: [u8; 16],
}

#[derive(Clone, Debug)]
pub struct Manifest {
    pub path: PathBuf,
    pub gpt: bool,
    pub sector: u64,
    pub size: u64,
    pub state: Option<StatePart>,
    /// Path of the identity inside the state filesystem.
    pub identity: Option<String>,
}

/// Read `IMAGE.layout.json` (forge's layout manifest): what provisioning
/// needs of it.
pub fn manifest(src: &crate::source::Source) -> Result<Manifest> {
    let path = formats::manifest::path_for(&src.path);
    let m = src.manifest()?.with_context(|| {
        format!(
            "{}: no layout manifest ({}); --identity, --fill and --except-state need forge's",
            src.path.display(),
            path.display()
        )
    })?;
    let bad = |what: &str| anyhow::anyhow!("{}: not a layout manifest: {what}", path.display());
    let gpt = match m.table.as_str() {
        "gpt" => true,
        "mbr" => false,
        _ => return Err(bad("no table")),
    };
    let state = m
        .part(formats::manifest::Role::State)
        .map(|p| -> Result<StatePart> {
            let fs = p
                .filesystem
                .as_ref()
                .ok_or_else(|| bad("the state partition has no filesystem"))?;
            Ok(StatePart {
                index: p
                    .number
                    .checked_sub(1)
                    .ok_or_else(|| bad("a partition numbered 0"))? as usize,
                offset: p.offset,
                size: p.size,
                label: fs.label.clone(),
                uuid: formats::seed::parse_uuid(&fs.uuid)
                    .ok_or_else(|| bad("the state filesystem has no UUID"))?,
            })
        })
        .transpose()?;
    Ok(Manifest {
        path,
        gpt,
        sector: m.sector_size,
        size: m.size,
        state,
        identity: m.identity.map(|i| i.path),
    })
}

/// What a device is asked to get.
#[derive(Clone, Debug, Default)]
pub struct Request {
    pub identity: Option<PathBuf>,
    pub hostname: Option<String>,
    pub host_key: bool,
    pub fill: bool,
    /// Every timestamp in the state filesystem (SOURCE_DATE_EPOCH).
    pub epoch: u32,
    /// A machine-id from the OS's randomness when the identity has none.
    pub generate_machine_id: bool,
}

/// A piece of a device's own bytes: data, or zeros (kept as a length,
/// written from one zero buffer).
#[derive(Clone, Debug)]
pub enum Bytes {
    Data(Arc<Vec<u8>>),
    Zeros(usize),
}

impl Bytes {
    pub fn len(&self) -> usize {
        match self {
            Bytes::Data(b) => b.len(),
            Bytes::Zeros(n) => *n,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One device's own bytes.
pub struct Personal {
    /// Image bytes in `[start, end)` are not written to this device.
    pub replace: (u64, u64),
    /// Written there instead: ascending (device offset, bytes).
    pub extents: Vec<(u64, Bytes)>,
    /// The partition table from offset 0, when it changes.
    pub head: Option<Vec<u8>>,
    /// A GPT's backup (entries then header) at the device's end.
    pub backup: Option<(u64, Vec<u8>)>,
    pub state_size: u64,
    pub host_key: Option<HostKey>,
    /// The identity's machine-id (its own, or the one generated).
    pub machine_id: Option<String>,
    /// Files in the identity, for the report.
    pub identity_files: usize,
}

/// Where the state partition ends on a device of `dev_size` bytes: the
/// last whole MiB before the backup GPT (or the end, for MBR).
fn filled_end(m: &Manifest, dev_size: u64, lbs: u64) -> u64 {
    let usable_end = if m.gpt {
        // The backup entry array (16 KiB) and header at the end.
        dev_size / lbs * lbs - (16 << 10).max(lbs) - lbs
    } else {
        dev_size
    };
    usable_end / MIB * MIB
}

pub fn plan(m: &Manifest, head: &[u8], dev_size: u64, lbs: u64, req: &Request) -> Result<Personal> {
    let what = if req.fill { "--fill" } else { "--identity" };
    let Some(st) = &m.state else {
        bail!(
            "{what}: the image has no state partition ({} lists none)",
            m.path.display()
        );
    };
    let new_size = if req.fill {
        let end = filled_end(m, dev_size, lbs);
        if end < st.offset + st.size {
            bail!("{what}: the device ends before the image's state partition");
        }
        end - st.offset
    } else {
        st.size
    };
    if !m.gpt && new_size / 512 > u64::from(u32::MAX) {
        bail!("{what}: an MBR partition cannot pass 2 TiB; the state partition would be {new_size} bytes");
    }
    // The state tree: as the image's (an empty root), plus the identity.
    let gen = Generate {
        hostname: req.hostname.clone(),
        machine_id: req.generate_machine_id.then_some(MachineId::Random),
        host_key: req.host_key,
        keep_host_key: None,
    };
    let id =
        identity::build(req.identity.as_deref(), &gen).with_context(|| match &req.identity {
            Some(d) => format!("the identity {}", d.display()),
            None => "the identity".into(),
        })?;
    let files = count_files(&id.tree);
    let machine_id = identity::text_of(&id.tree, b"machine-id");
    let mut tree = Tree::new(0o755);
    let at = m.identity.as_deref().unwrap_or("identity");
    tree.nest(ROOT, at.as_bytes(), id.tree)?;
    let opts = ext4::Options {
        size: Size::Fixed(new_size),
        label: st.label.clone(),
        uuid: st.uuid,
        hash_seed: formats::seed::uuid(&formats::seed::format_uuid(&st.uuid), "ext4:state:hash"),
        journal: ext4::Journal::Lazy {
            sequence: journal_sequence()?,
        },
        epoch: req.epoch,
    };
    let fs_plan = ext4::plan(&tree, &opts).context("planning the device's state filesystem")?;
    let extents = extents_at(&fs_plan, st.offset)?;
    let (head, backup) = if req.fill {
        table(m, st, head, dev_size, lbs, new_size)?
    } else {
        (None, None)
    };
    Ok(Personal {
        replace: (
            st.offset,
            if req.fill {
                m.size
            } else {
                st.offset + st.size
            },
        ),
        extents,
        head,
        backup,
        state_size: new_size,
        machine_id,
        host_key: id.host_key,
        identity_files: files,
    })
}

/// The state filesystem's bytes at `offset` on the device, in pieces of
/// at most 4 MiB, each written, then read back, whole.
fn extents_at(fs_plan: &ext4::Plan, offset: u64) -> Result<Vec<(u64, Bytes)>> {
    let mut out = Extents::default();
    fs_plan
        .write(&mut out, 0)
        .context("writing the device's state filesystem")?;
    let mut extents = Vec::new();
    for (o, p) in out.into_extents() {
        let at = offset + o;
        match p {
            Piece::Data(b) => {
                for (i, c) in b.chunks(PIECE).enumerate() {
                    extents.push((at + (i * PIECE) as u64, Bytes::Data(Arc::new(c.to_vec()))));
                }
            }
            Piece::Zeros(n) => {
                let mut k = 0;
                while k < n {
                    let len = (n - k).min(PIECE as u64) as usize;
                    extents.push((at + k, Bytes::Zeros(len)));
                    k += len as u64;
                }
            }
        }
    }
    Ok(extents)
}

/// A journal's first transaction number, unlike anything a card held.
fn journal_sequence() -> Result<u32> {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("the OS's randomness: {e}"))?;
    Ok(u32::from_le_bytes(b))
}

fn count_files(t: &Tree) -> usize {
    t.nodes
        .iter()
        .filter(|n| matches!(n.kind, formats::tree::Kind::File { .. }))
        .count()
}

/// Reads within a first MiB held in memory.
fn reader(head: &[u8]) -> impl FnMut(u64, usize) -> std::io::Result<Vec<u8>> + '_ {
    |o: u64, n: usize| {
        o.checked_add(n as u64)
            .and_then(|end| head.get(o as usize..end as usize))
            .map(|s| s.to_vec())
            .ok_or_else(|| std::io::Error::other("outside the first MiB"))
    }
}

/// A device's state partition as its own table (`dev_head`, its first
/// MiB) has it now, for comparing everything else with the image (`flash
/// verify --except-state`): that partition is the device's own, written
/// by provisioning or by the running system, and is not compared. The
/// table must be the image's, or, where the partition was grown, exactly
/// what `--fill` writes for its present size.
pub fn as_found(
    m: &Manifest,
    head: &[u8],
    dev_head: &[u8],
    dev_size: u64,
    lbs: u64,
) -> Result<Personal> {
    let Some(st) = &m.state else {
        bail!(
            "the image has no state partition ({} lists none)",
            m.path.display()
        );
    };
    let size = if m.gpt {
        let g = formats::gpt::Gpt::parse(&mut reader(dev_head), lbs, dev_size)
            .with_context(|| format!("the device's GPT (sectors of {lbs} bytes)"))?
            .context("the device has no GPT, but the image has")?;
        let p = g
            .partitions
            .iter()
            .find(|p| p.first_lba.checked_mul(lbs) == Some(st.offset))
            .context("no partition of the device starts where the image's state partition does")?;
        p.last_lba
            .checked_add(1)
            .and_then(|n| n.checked_mul(lbs))
            .and_then(|end| end.checked_sub(st.offset))
            .context("the device's state partition entry ends before it starts")?
    } else {
        let e = formats::mbr::parse(dev_head)
            .context("the device has no MBR, but the image has")?
            .entries
            .get(st.index)
            .cloned()
            .context("the manifest's state partition is not one of an MBR's four")?;
        if u64::from(e.first_lba) * 512 != st.offset {
            bail!(
                "the device's MBR entry {} does not start where the image's state partition does",
                st.index + 1
            );
        }
        u64::from(e.sectors) * 512
    };
    if size < st.size {
        bail!(
            "the device's state partition ({size} bytes) is smaller than the image's ({} bytes)",
            st.size
        );
    }
    let grown = size != st.size;
    let (head, backup) = if grown {
        table(m, st, head, dev_size, lbs, size)?
    } else {
        (None, None)
    };
    Ok(Personal {
        replace: (st.offset, if grown { m.size } else { st.offset + st.size }),
        extents: Vec::new(),
        head,
        backup,
        state_size: size,
        host_key: None,
        machine_id: None,
        identity_files: 0,
    })
}

/// The table with the state partition ending at `new_size`.
#[allow(clippy::type_complexity)]
fn table(
    m: &Manifest,
    st: &StatePart,
    head: &[u8],
    dev_size: u64,
    lbs: u64,
    new_size: u64,
) -> Result<(Option<Vec<u8>>, Option<(u64, Vec<u8>)>)> {
    if m.gpt {
        let mut g = formats::gpt::Gpt::parse(&mut reader(head), lbs, m.size)
            .with_context(|| format!("the image's GPT (sectors of {lbs} bytes)"))?
            .context("the image has no GPT, but its manifest says gpt")?;
        let p = g
            .partitions
            .iter_mut()
            .find(|p| p.first_lba.checked_mul(lbs) == Some(st.offset))
            .context("no GPT entry starts where the manifest's state partition does")?;
        p.last_lba = (st.offset + new_size) / lbs - 1;
        g.disk_sectors = dev_size / lbs;
        Ok((Some(g.primary()), Some(g.backup())))
    } else {
        let mut mbr = head.get(..512).context("no MBR")?.to_vec();
        let e = formats::mbr::parse(&mbr)
            .and_then(|m| m.entries.get(st.index).cloned())
            .context("the manifest's state partition is not one of the image's MBR entries")?;
        if u64::from(e.first_lba) * 512 != st.offset {
            bail!(
                "MBR entry {} does not start where the manifest's state partition does",
                st.index + 1
            );
        }
        let sectors = u32::try_from(new_size / 512).context("an MBR partition past 2 TiB")?;
        formats::mbr::set_sectors(&mut mbr, st.index, sectors)
            .context("the state partition's MBR entry cannot be resized")?;
        Ok((Some(mbr), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device's own table, however mangled (a card flashed, booted and
    /// repartitioned, or failing), gives a result or an error, never a
    /// panic or a wrapped number: its GPT header and entries, an MBR's
    /// entries, the device's size and sector size all vary.
    #[test]
    fn as_found_never_panics() {
        let heads: Vec<(u64, Vec<u8>)> = [512u64, 4096]
            .iter()
            .map(|&ss| {
                let g = crate::write::tests::gpt_with_one(ss, 64 << 20, "state");
                (ss, g.primary())
            })
            .collect();
        let manifest = |gpt: bool, sector: u64| Manifest {
            path: "x.img.layout.json".into(),
            gpt,
            sector,
            size: 9 << 20,
            state: Some(StatePart {
                index: 0,
                offset: 1 << 20,
                size: 7 << 20,
                label: "state".into(),
                uuid: [3; 16],
            }),
            identity: Some("identity".into()),
        };
        formats::fuzz::run("personal::as_found", 2000, |r| {
            let (ss, base) = &heads[r.below(2)];
            let mut dev = base.clone();
            // The header and the first entries, where the numbers are.
            for _ in 0..r.below(8) {
                let i = *ss as usize + r.below(*ss as usize + 256);
                if i < dev.len() {
                    dev[i] = r.word() as u8;
                }
            }
            r.mutate(&mut dev, 2);
            let dev_size = [r.word(), 64 << 20, r.word() % (1 << 40), 0][r.below(4)];
            let lbs = [*ss, 512, 4096, r.word() % 8192][r.below(4)];
            let gpt = r.below(2) == 0;
            let _ = as_found(&manifest(gpt, *ss), base, &dev, dev_size, lbs);
            let n = r.below(2048);
            let _ = as_found(&manifest(gpt, *ss), &r.bytes(n), &r.bytes(n), dev_size, lbs);
        });
    }
}
