//! Which partition table an image starts with, and how far it says the
//! image reaches, read from the image's first MiB alone. Any bytes give an
//! answer or an error, never a panic or a wrapped number.

use crate::gpt::{Gpt, Header};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A GPT for this sector size.
    Gpt(u32),
    /// A DOS partition table (512-byte sectors).
    Mbr,
}

/// A table and its reach: the byte just past the furthest thing it
/// points at (a partition's end, the backup GPT header), and what that is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub kind: Kind,
    pub reach: u64,
    pub what: String,
}

impl Found {
    pub fn sector_size(&self) -> u32 {
        match self.kind {
            Kind::Gpt(ss) => ss,
            Kind::Mbr => 512,
        }
    }
}

/// The table's own inconsistency, at a byte offset.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TableError(pub String);

/// The table at the start of `head` (an image's first MiB, or all of a
/// shorter one), if there is one.
pub fn probe(head: &[u8]) -> Result<Option<Found>, TableError> {
    for ss in [512u64, 4096] {
        if head.get(ss as usize..ss as usize + 8) == Some(b"EFI PART".as_slice()) {
            return gpt(head, ss).map(Some);
        }
    }
    mbr(head)
}

fn gpt(head: &[u8], ss: u64) -> Result<Found, TableError> {
    let err = |e: crate::gpt::GptError| TableError(format!("primary {e}"));
    let h = Header::parse(&head[ss as usize..(2 * ss as usize).min(head.len())], ss)
        .map_err(err)?
        .ok_or_else(|| TableError("no GPT header".into()))?;
    let mut read = |o: u64, n: usize| -> std::io::Result<Vec<u8>> {
        o.checked_add(n as u64)
            .and_then(|e| head.get(o as usize..usize::try_from(e).ok()?))
            .map(<[u8]>::to_vec)
            .ok_or_else(|| std::io::Error::other("the entry array is not in the first MiB"))
    };
    let g = Gpt::parse(&mut read, ss, u64::MAX)
        .map_err(err)?
        .ok_or_else(|| TableError("no GPT header".into()))?;
    let end = |lba: u64| lba.checked_add(1).and_then(|n| n.checked_mul(ss));
    let mut found = Found {
        kind: Kind::Gpt(ss as u32),
        reach: end(h.alternate_lba).ok_or_else(|| {
            TableError(format!(
                "backup GPT header at LBA {} is past any disk",
                h.alternate_lba
            ))
        })?,
        what: "the backup GPT header".into(),
    };
    for (i, p) in g.partitions.iter().enumerate() {
        let e = match end(p.last_lba) {
            Some(e) if p.last_lba >= p.first_lba => e,
            _ => {
                return Err(TableError(format!(
                    "partition {}: LBAs {}..={} are not a valid range",
                    i + 1,
                    p.first_lba,
                    p.last_lba
                )))
            }
        };
        if e > found.reach {
            found.reach = e;
            found.what = format!("partition {}", i + 1);
        }
    }
    Ok(found)
}

fn mbr(head: &[u8]) -> Result<Option<Found>, TableError> {
    let Some(m) = crate::mbr::parse(head) else {
        return Ok(None);
    };
    if head[446..510].iter().all(|&b| b == 0) {
        return Ok(None);
    }
    let mut found = Found {
        kind: Kind::Mbr,
        reach: 512,
        what: "the MBR".into(),
    };
    for (i, e) in m.entries.iter().enumerate() {
        // An empty entry, or a GPT's protective one, says nothing.
        if e.kind == 0 || e.kind == 0xEE {
            continue;
        }
        let reach = (u64::from(e.first_lba) + u64::from(e.sectors)) * 512;
        if reach > found.reach {
            found.reach = reach;
            found.what = format!("partition {}", i + 1);
        }
    }
    Ok(Some(found))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpt;

    fn gpt_image(ss: u64, size: u64) -> Vec<u8> {
        let g = Gpt {
            sector: ss,
            disk_sectors: size / ss,
            disk_guid: [1; 16],
            partitions: vec![gpt::Partition {
                type_guid: [2; 16],
                guid: [3; 16],
                first_lba: (1 << 20) / ss,
                last_lba: (size - (1 << 20)) / ss - 1,
                attributes: 0,
                name: "p".into(),
            }],
        };
        let mut head = g.primary();
        head.resize(1 << 20, 0);
        head
    }

    #[test]
    fn gpt_reaches_its_backup_header_and_mbr_its_last_partition() {
        for ss in [512u64, 4096] {
            let f = probe(&gpt_image(ss, 64 << 20)).unwrap().unwrap();
            assert_eq!(f.kind, Kind::Gpt(ss as u32));
            assert_eq!(
                (f.reach, f.what.as_str()),
                (64 << 20, "the backup GPT header")
            );
        }
        let mut m = vec![0u8; 512];
        m[446 + 16 + 4] = 0x83;
        m[446 + 16 + 8..446 + 16 + 12].copy_from_slice(&2048u32.to_le_bytes());
        m[446 + 16 + 12..446 + 16 + 16].copy_from_slice(&4096u32.to_le_bytes());
        m[510] = 0x55;
        m[511] = 0xAA;
        let f = probe(&m).unwrap().unwrap();
        assert_eq!(
            (f.kind, f.reach, f.what.as_str()),
            (Kind::Mbr, 6144 * 512, "partition 2")
        );
        assert!(probe(b"hello").unwrap().is_none());
        assert!(probe(&[]).unwrap().is_none());
    }

    #[test]
    fn gpt_fields_that_would_overflow_are_errors_not_wrapped_offsets() {
        let g = |disk_sectors: u64, last_lba: u64| {
            let mut head = Gpt {
                sector: 512,
                disk_sectors,
                disk_guid: [1; 16],
                partitions: vec![gpt::Partition {
                    type_guid: [2; 16],
                    guid: [3; 16],
                    first_lba: 2048,
                    last_lba,
                    attributes: 0,
                    name: "p".into(),
                }],
            }
            .primary();
            head.resize(1 << 20, 0);
            probe(&head)
        };
        let e = g(1 << 20, u64::MAX / 512 + 5).unwrap_err().to_string();
        assert!(
            e.contains("partition 1: LBAs 2048..=") && e.contains("not a valid range"),
            "{e}"
        );
        let e = g(1 << 20, 100).unwrap_err().to_string();
        assert!(e.contains("not a valid range"), "last before first: {e}");
        let e = g(u64::MAX, 4095).unwrap_err().to_string();
        assert!(
            e.contains("backup GPT header at LBA") && e.contains("past any disk"),
            "{e}"
        );
    }

    /// Recompute a GPT's CRCs so mutations reach past the checksums.
    fn fix_crcs(b: &mut [u8], ss: usize) {
        if b.len() < 2 * ss || &b[ss..ss + 8] != b"EFI PART" {
            return;
        }
        let u = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as u64;
        let lba = u64::from_le_bytes(b[ss + 72..ss + 80].try_into().unwrap());
        let n = u(b, ss + 80).min(1024) * u(b, ss + 84).min(4096);
        if let Some(a) = lba
            .checked_mul(ss as u64)
            .filter(|a| a + n <= b.len() as u64)
        {
            let crc = crc32fast::hash(&b[a as usize..(a + n) as usize]);
            b[ss + 88..ss + 92].copy_from_slice(&crc.to_le_bytes());
        }
        let hs = (u(b, ss + 12) as usize).clamp(92, ss);
        b[ss + 16..ss + 20].fill(0);
        let crc = crc32fast::hash(&b[ss..ss + hs]);
        b[ss + 16..ss + 20].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn arbitrary_and_mutated_tables_never_panic() {
        let bases = [gpt_image(512, 64 << 20), gpt_image(4096, 64 << 20)];
        crate::fuzz::run("table::probe", 3000, |r| {
            let ss = [512, 4096][r.below(2)];
            let mut b = bases[(ss == 4096) as usize][..40_000].to_vec();
            // Mutate the header and the first entries, where the numbers are.
            for _ in 0..r.below(6) {
                let i = ss + r.below(ss + 512);
                b[i] = r.word() as u8;
            }
            if r.below(2) == 0 {
                fix_crcs(&mut b, ss);
            }
            r.mutate(&mut b, 1);
            let _ = probe(&b);
            let n = r.below(1200);
            let _ = probe(&r.bytes(n));
        });
    }
}
