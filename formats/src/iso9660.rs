//! ISO 9660 (ECMA-119) volume metadata for a hybrid image whose files are
//! partitions: the volume descriptors (primary, El Torito boot record,
//! Joliet supplementary, terminator), the path tables, one root directory
//! per naming (Rock Ridge in the primary's, UCS-2 in Joliet's) and the El
//! Torito boot catalog. The files' bytes are not here: each file is a
//! range of the image written by its own writer (the ESP's FAT, the root
//! filesystem), so a GPT can name the same bytes as partitions and the
//! one file boots as a CD and as a disk.
//!
//! Everything lives in blocks 16.. of 2048 bytes ([`START`]); the caller
//! keeps the first 32 KiB (the system area) for its MBR and GPT.

use std::fmt;

/// ISO 9660's logical block.
pub const BLOCK: u64 = 2048;
/// Where the volume descriptors start: after the 32 KiB system area.
pub const START: u64 = 16 * BLOCK;
/// One directory record's extent holds at most this many bytes; a longer
/// file is recorded as several extents (ECMA-119 level 3, multi-extent).
const MAX_EXTENT: u64 = 0xFFFF_F800;

/// A file of the volume: `len` bytes at byte `start` of the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct File {
    /// Its name: lower-case letters, digits, `_`, one `.` and an
    /// extension of at most 3 (an 8.3 name, so ISO level 1 readers show
    /// it too).
    pub name: String,
    pub start: u64,
    pub len: u64,
}

#[derive(Clone, Debug)]
pub struct Volume {
    /// Upper-case letters, digits and `_`, at most 32.
    pub volume_id: String,
    /// Every date on the volume (Unix seconds, UTC).
    pub epoch: i64,
    /// The image's whole size in bytes (a multiple of [`BLOCK`]).
    pub size: u64,
    pub files: Vec<File>,
    /// The file El Torito boots (no emulation, platform EFI): an ESP.
    pub efi_boot: usize,
}

#[derive(Debug, PartialEq, Eq)]
pub struct IsoError(String);

impl fmt::Display for IsoError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for IsoError {}

fn err<T>(s: String) -> Result<T, IsoError> {
    Err(IsoError(s))
}

/// The blocks of the metadata, in order from block 16.
const PVD: u32 = 16;
const BOOT_RECORD: u32 = 17;
const JOLIET_VD: u32 = 18;
const TERMINATOR: u32 = 19;
const PATH_L: u32 = 20;
const PATH_M: u32 = 21;
const JPATH_L: u32 = 22;
const JPATH_M: u32 = 23;
const ROOT: u32 = 24;
const JROOT: u32 = 25;
const CATALOG: u32 = 26;
const BLOCKS: u32 = 27;

/// Bytes the metadata takes from [`START`].
pub const fn metadata_len() -> u64 {
    (BLOCKS as u64 - 16) * BLOCK
}

fn both32(v: u32) -> [u8; 8] {
    let mut b = [0; 8];
    b[..4].copy_from_slice(&v.to_le_bytes());
    b[4..].copy_from_slice(&v.to_be_bytes());
    b
}

fn both16(v: u16) -> [u8; 4] {
    let mut b = [0; 4];
    b[..2].copy_from_slice(&v.to_le_bytes());
    b[2..].copy_from_slice(&v.to_be_bytes());
    b
}

/// A directory record's 7-byte recording date (UTC).
fn record_date(unix: i64) -> [u8; 7] {
    let (y, mo, d, s) = crate::time::civil(unix);
    let year = (y - 1900).clamp(0, 255) as u8;
    [
        year,
        mo as u8,
        d as u8,
        (s / 3600) as u8,
        (s / 60 % 60) as u8,
        (s % 60) as u8,
        0,
    ]
}

/// A volume descriptor's 17-byte date: `YYYYMMDDHHMMSScc` and the zone.
fn volume_date(unix: Option<i64>) -> [u8; 17] {
    let mut b = [b'0'; 17];
    b[16] = 0;
    if let Some(t) = unix {
        let (y, mo, d, s) = crate::time::civil(t);
        let text = format!(
            "{:04}{mo:02}{d:02}{:02}{:02}{:02}00",
            y.clamp(0, 9999),
            s / 3600,
            s / 60 % 60,
            s % 60
        );
        b[..16].copy_from_slice(text.as_bytes());
    }
    b
}

fn padded(text: &[u8], len: usize, pad: u8) -> Vec<u8> {
    let mut v = text[..text.len().min(len)].to_vec();
    v.resize(len, pad);
    v
}

fn ucs2(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|c| c.to_be_bytes()).collect()
}

/// Joliet's fields of `len` bytes: UCS-2 big-endian, padded with spaces.
fn ucs2_padded(s: &str, len: usize) -> Vec<u8> {
    let mut v = ucs2(s);
    v.truncate(len & !1);
    while v.len() < len {
        v.extend_from_slice(&[0, b' ']);
    }
    v.truncate(len);
    v
}

/// Which of the two trees a record is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Naming {
    /// ISO level 1 names with Rock Ridge's own.
    RockRidge,
    Joliet,
}

/// One directory record. `id` is the identifier as stored; `susp` the
/// System Use entries after it.
fn record(
    id: &[u8],
    extent: u32,
    len: u32,
    dir: bool,
    more: bool,
    date: [u8; 7],
    susp: &[u8],
) -> Vec<u8> {
    let mut r = vec![0u8; 33];
    r[2..10].copy_from_slice(&both32(extent));
    r[10..18].copy_from_slice(&both32(len));
    r[18..25].copy_from_slice(&date);
    r[25] = u8::from(dir) << 1 | u8::from(more) << 7;
    r[28..32].copy_from_slice(&both16(1));
    r[32] = id.len() as u8;
    r.extend_from_slice(id);
    if r.len() % 2 == 1 {
        r.push(0);
    }
    r.extend_from_slice(susp);
    r[0] = r.len() as u8;
    r
}

/// Rock Ridge's entries for a file or directory: POSIX mode (PX), times
/// (TF: modified, accessed, attributes changed) and, but for `.` and
/// `..`, its name (NM).
fn rock_ridge(mode: u32, links: u32, date: [u8; 7], name: Option<&str>) -> Vec<u8> {
    let mut s = vec![b'P', b'X', 36, 1];
    for v in [mode, links, 0, 0] {
        s.extend_from_slice(&both32(v));
    }
    s.extend_from_slice(&[b'T', b'F', 5 + 21, 1, 0x0E]);
    for _ in 0..3 {
        s.extend_from_slice(&date);
    }
    if let Some(n) = name {
        s.extend_from_slice(&[b'N', b'M', 5 + n.len() as u8, 1, 0]);
        s.extend_from_slice(n.as_bytes());
    }
    s
}

/// The root's `.` entries that announce Rock Ridge: SUSP's SP, the RR
/// flags (PX, NM, TF used) and the ER naming RRIP 1.09.
fn rock_ridge_root() -> Vec<u8> {
    let mut s = vec![b'S', b'P', 7, 1, 0xBE, 0xEF, 0];
    s.extend_from_slice(&[b'R', b'R', 5, 1, 0x01 | 0x08 | 0x80]);
    let (id, des, src) = (
        &b"RRIP_1991A"[..],
        &b"ROCK RIDGE POSIX NAMES AND MODES"[..],
        &b"NIXFORGE"[..],
    );
    s.extend_from_slice(&[b'E', b'R', (8 + id.len() + des.len() + src.len()) as u8, 1]);
    s.extend_from_slice(&[id.len() as u8, des.len() as u8, src.len() as u8, 1]);
    for part in [id, des, src] {
        s.extend_from_slice(part);
    }
    s
}

impl Volume {
    fn check(&self) -> Result<(), IsoError> {
        if !self.size.is_multiple_of(BLOCK) || self.size / BLOCK > u32::MAX as u64 {
            return err(format!(
                "an ISO image of {} bytes: not a whole number of 2048-byte blocks under 8 TiB",
                self.size
            ));
        }
        let id_ok = |c: char| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_';
        if self.volume_id.len() > 32 || !self.volume_id.chars().all(id_ok) {
            return err(format!(
                "ISO volume id {:?}: at most 32 of A-Z, 0-9, _",
                self.volume_id
            ));
        }
        let meta_end = START + metadata_len();
        for f in &self.files {
            if !valid_name(&f.name) {
                return err(format!(
                    "ISO file name {:?}: an 8.3 name of a-z, 0-9, _",
                    f.name
                ));
            }
            if f.name == "boot.cat" {
                return err("ISO file name boot.cat: the name is the boot catalog's".into());
            }
            if !f.start.is_multiple_of(BLOCK) || f.start < meta_end || f.start + f.len > self.size {
                return err(format!("ISO file {}: bytes {}..{} are not whole blocks after the metadata and inside the image", f.name, f.start, f.start + f.len));
            }
        }
        Ok(())
    }

    /// The files as the directory lists them: sorted by name, with the
    /// boot catalog.
    fn listed(&self) -> Vec<File> {
        let mut v = self.files.clone();
        v.push(File {
            name: "boot.cat".into(),
            start: CATALOG as u64 * BLOCK,
            len: BLOCK,
        });
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// A root directory's block: `.`, `..`, then each file's records.
    fn directory(&self, naming: Naming) -> Result<Vec<u8>, IsoError> {
        let date = record_date(self.epoch);
        let me = if naming == Naming::Joliet {
            JROOT
        } else {
            ROOT
        };
        let rr = naming == Naming::RockRidge;
        let dir_susp = |first: bool| -> Vec<u8> {
            if !rr {
                return Vec::new();
            }
            let mut s = if first { rock_ridge_root() } else { Vec::new() };
            s.extend(rock_ridge(0o040555, 2, date, None));
            s
        };
        let mut out = record(&[0], me, BLOCK as u32, true, false, date, &dir_susp(true));
        out.extend(record(
            &[1],
            me,
            BLOCK as u32,
            true,
            false,
            date,
            &dir_susp(false),
        ));
        for f in self.listed() {
            let id = match naming {
                Naming::RockRidge => format!("{};1", f.name.to_ascii_uppercase()).into_bytes(),
                Naming::Joliet => ucs2(&f.name),
            };
            let susp = if rr {
                rock_ridge(0o100444, 1, date, Some(&f.name))
            } else {
                Vec::new()
            };
            let mut at = f.start;
            let mut left = f.len;
            loop {
                let n = left.min(MAX_EXTENT);
                out.extend(record(
                    &id,
                    (at / BLOCK) as u32,
                    n as u32,
                    false,
                    n < left,
                    date,
                    &susp,
                ));
                at += n;
                left -= n;
                if left == 0 {
                    break;
                }
            }
        }
        if out.len() as u64 > BLOCK {
            return err(format!(
                "{} ISO files do not fit one directory block",
                self.files.len()
            ));
        }
        out.resize(BLOCK as usize, 0);
        Ok(out)
    }

    /// A path table of the one directory, the root, at `extent`.
    fn path_table(extent: u32, big_endian: bool) -> Vec<u8> {
        let mut t = vec![1u8, 0];
        if big_endian {
            t.extend_from_slice(&extent.to_be_bytes());
            t.extend_from_slice(&1u16.to_be_bytes());
        } else {
            t.extend_from_slice(&extent.to_le_bytes());
            t.extend_from_slice(&1u16.to_le_bytes());
        }
        t.extend_from_slice(&[0, 0]);
        t
    }

    /// The primary (Rock Ridge) or the Joliet descriptor.
    fn descriptor(&self, naming: Naming) -> Vec<u8> {
        let joliet = naming == Naming::Joliet;
        let text = |s: &str, len: usize| {
            if joliet {
                ucs2_padded(s, len)
            } else {
                padded(s.as_bytes(), len, b' ')
            }
        };
        let mut d = vec![0u8; BLOCK as usize];
        d[0] = if joliet { 2 } else { 1 };
        d[1..6].copy_from_slice(b"CD001");
        d[6] = 1;
        d[8..40].copy_from_slice(&text("LINUX", 32));
        d[40..72].copy_from_slice(&text(&self.volume_id, 32));
        d[80..88].copy_from_slice(&both32((self.size / BLOCK) as u32));
        if joliet {
            d[88..91].copy_from_slice(b"%/E"); // UCS-2 level 3
        }
        d[120..124].copy_from_slice(&both16(1));
        d[124..128].copy_from_slice(&both16(1));
        d[128..132].copy_from_slice(&both16(BLOCK as u16));
        d[132..140].copy_from_slice(&both32(10));
        let (l, m, root) = if joliet {
            (JPATH_L, JPATH_M, JROOT)
        } else {
            (PATH_L, PATH_M, ROOT)
        };
        d[140..144].copy_from_slice(&l.to_le_bytes());
        d[148..152].copy_from_slice(&m.to_be_bytes());
        let r = record(
            &[0],
            root,
            BLOCK as u32,
            true,
            false,
            record_date(self.epoch),
            &[],
        );
        d[156..190].copy_from_slice(&r);
        for (at, len) in [
            (190, 128),
            (318, 128),
            (446, 128),
            (702, 37),
            (739, 37),
            (776, 37),
        ] {
            d[at..at + len].copy_from_slice(&text("", len));
        }
        d[574..702].copy_from_slice(&text("NIXFORGE", 128));
        d[813..830].copy_from_slice(&volume_date(Some(self.epoch)));
        d[830..847].copy_from_slice(&volume_date(Some(self.epoch)));
        d[847..864].copy_from_slice(&volume_date(None));
        d[864..881].copy_from_slice(&volume_date(None));
        d[881] = 1;
        d
    }

    /// El Torito's boot record and catalog (one bootable EFI entry).
    fn boot(&self, file: &File) -> (Vec<u8>, Vec<u8>) {
        let mut br = vec![0u8; BLOCK as usize];
        br[1..6].copy_from_slice(b"CD001");
        br[6] = 1;
        br[7..39].copy_from_slice(&padded(b"EL TORITO SPECIFICATION", 32, 0));
        br[71..75].copy_from_slice(&CATALOG.to_le_bytes());
        let mut cat = vec![0u8; BLOCK as usize];
        cat[0] = 1;
        cat[1] = 0xEF; // EFI
        cat[30] = 0x55;
        cat[31] = 0xAA;
        let sum = (0..16).fold(0u16, |s, i| {
            s.wrapping_add(u16::from_le_bytes([cat[2 * i], cat[2 * i + 1]]))
        });
        cat[28..30].copy_from_slice(&0u16.wrapping_sub(sum).to_le_bytes());
        cat[32] = 0x88; // bootable, no emulation
                        // 512-byte virtual sectors, as many as fit 16 bits (firmware
                        // reads the FAT's own size).
        let sectors = file.len.div_ceil(512).min(0xFFFF) as u16;
        cat[38..40].copy_from_slice(&sectors.to_le_bytes());
        cat[40..44].copy_from_slice(&((file.start / BLOCK) as u32).to_le_bytes());
        (br, cat)
    }

    /// The metadata's bytes, to write at [`START`] of the image.
    pub fn encode(&self) -> Result<Vec<u8>, IsoError> {
        self.check()?;
        let block = |n: u32| ((n - 16) as u64 * BLOCK) as usize;
        let mut out = vec![0u8; metadata_len() as usize];
        let mut put = |n: u32, b: &[u8]| out[block(n)..block(n) + b.len()].copy_from_slice(b);
        put(PVD, &self.descriptor(Naming::RockRidge));
        let f = self
            .files
            .get(self.efi_boot)
            .ok_or_else(|| IsoError("internal: the El Torito file is not on the volume".into()))?;
        let (br, cat) = self.boot(f);
        put(BOOT_RECORD, &br);
        put(CATALOG, &cat);
        put(JOLIET_VD, &self.descriptor(Naming::Joliet));
        let mut term = vec![0u8; 7];
        term[0] = 255;
        term[1..6].copy_from_slice(b"CD001");
        term[6] = 1;
        put(TERMINATOR, &term);
        put(PATH_L, &Self::path_table(ROOT, false));
        put(PATH_M, &Self::path_table(ROOT, true));
        put(JPATH_L, &Self::path_table(JROOT, false));
        put(JPATH_M, &Self::path_table(JROOT, true));
        put(ROOT, &self.directory(Naming::RockRidge)?);
        put(JROOT, &self.directory(Naming::Joliet)?);
        Ok(out)
    }
}

/// What a reader finds of a volume: its id, its root's files (Rock
/// Ridge names where there are, else ISO names without `;1`; a
/// multi-extent file's extents joined) and the El Torito EFI entry's
/// image (its block); None when `image` (from byte 0) holds no ISO 9660
/// volume.
pub fn read(image: &mut (impl std::io::Read + std::io::Seek)) -> std::io::Result<Option<Found>> {
    match read_volume(image) {
        // A block named past the image's end: no volume of ours.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        r => r,
    }
}

fn read_volume(image: &mut (impl std::io::Read + std::io::Seek)) -> std::io::Result<Option<Found>> {
    let mut block = |n: u64| -> std::io::Result<Vec<u8>> {
        let mut b = vec![0u8; BLOCK as usize];
        image.seek(std::io::SeekFrom::Start(n * BLOCK))?;
        image.read_exact(&mut b)?;
        Ok(b)
    };
    let (mut pvd, mut catalog) = (None, None);
    for n in 16..64 {
        let d = block(n)?;
        if &d[1..6] != b"CD001" || d[0] == 255 {
            break;
        }
        match d[0] {
            1 => pvd = Some(d),
            0 if d[7..30] == *b"EL TORITO SPECIFICATION" => {
                catalog = Some(u32::from_le_bytes(d[71..75].try_into().expect("4 bytes")))
            }
            _ => {}
        }
    }
    let Some(pvd) = pvd else { return Ok(None) };
    let le = |b: &[u8]| u32::from_le_bytes(b[..4].try_into().expect("4 bytes"));
    let dir = block(le(&pvd[158..]) as u64)?;
    let mut files: Vec<FoundFile> = Vec::new();
    let mut p = 0;
    let mut more = false;
    while p + 33 < dir.len() && dir[p] != 0 {
        let r = &dir[p..(p + dir[p] as usize).min(dir.len())];
        p += dir[p] as usize;
        if r.len() < 34 {
            break; // shorter than a record with a name: not ours
        }
        let n = r[32] as usize;
        if r.len() < 33 + n || r[25] & 2 != 0 {
            continue;
        }
        let (start, len) = (le(&r[2..]) as u64 * BLOCK, le(&r[10..]) as u64);
        match files.last_mut() {
            Some(f) if more => f.len += len,
            _ => files.push(FoundFile {
                name: nm_name(r, 33 + n + (n + 1) % 2).unwrap_or_else(|| {
                    let id = String::from_utf8_lossy(&r[33..33 + n]);
                    id.trim_end_matches(";1").to_string()
                }),
                start,
                len,
            }),
        }
        more = r[25] & 0x80 != 0;
    }
    let efi_boot = match catalog {
        Some(c) => {
            let cat = block(c as u64)?;
            (cat[32] == 0x88).then(|| le(&cat[40..]) as u64 * BLOCK)
        }
        None => None,
    };
    Ok(Some(Found {
        volume_id: String::from_utf8_lossy(&pvd[40..72]).trim_end().to_string(),
        files,
        efi_boot,
    }))
}

/// A record's Rock Ridge name (NM), from its System Use area at `at`.
fn nm_name(r: &[u8], mut at: usize) -> Option<String> {
    while at + 4 <= r.len() {
        let len = r[at + 2] as usize;
        if len < 4 || at + len > r.len() {
            return None;
        }
        if &r[at..at + 2] == b"NM" && len > 5 {
            return Some(String::from_utf8_lossy(&r[at + 5..at + len]).into_owned());
        }
        at += len;
    }
    None
}

/// See [`read`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub volume_id: String,
    pub files: Vec<FoundFile>,
    /// The byte El Torito's EFI image starts at.
    pub efi_boot: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundFile {
    pub name: String,
    pub start: u64,
    pub len: u64,
}

/// An 8.3 name of lower-case letters, digits and `_`.
fn valid_name(n: &str) -> bool {
    let ok = |s: &str, max: usize| {
        !s.is_empty()
            && s.len() <= max
            && s.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
    };
    match n.split_once('.') {
        Some((base, ext)) => ok(base, 8) && ok(ext, 3),
        None => ok(n, 8),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume() -> Volume {
        Volume {
            volume_id: "NIXOS_ISO".into(),
            epoch: 1_700_000_000,
            size: 64 << 20,
            files: vec![
                File {
                    name: "root.img".into(),
                    start: 16 << 20,
                    len: 40 << 20,
                },
                File {
                    name: "efi.img".into(),
                    start: 1 << 20,
                    len: 15 << 20,
                },
            ],
            efi_boot: 1,
        }
    }

    #[test]
    fn descriptors_catalog_and_directory_hold_what_readers_look_for() {
        let b = volume().encode().unwrap();
        let at = |n: u32| (n as usize - 16) * 2048;
        assert_eq!(&b[at(PVD)..at(PVD) + 6], b"\x01CD001");
        assert_eq!(
            &b[at(BOOT_RECORD) + 7..at(BOOT_RECORD) + 30],
            b"EL TORITO SPECIFICATION"
        );
        assert_eq!(&b[at(JOLIET_VD) + 88..at(JOLIET_VD) + 91], b"%/E");
        assert_eq!(b[at(TERMINATOR)], 255);
        // Volume space: 64 MiB in blocks, both byte orders.
        assert_eq!(&b[at(PVD) + 80..at(PVD) + 88], &both32(32768));
        // The catalog's validation entry sums to zero; the entry boots
        // the ESP's block.
        let cat = &b[at(CATALOG)..at(CATALOG) + 64];
        let sum = (0..16).fold(0u16, |s, i| {
            s.wrapping_add(u16::from_le_bytes([cat[2 * i], cat[2 * i + 1]]))
        });
        assert_eq!(sum, 0);
        assert_eq!(cat[32], 0x88);
        assert_eq!(u32::from_le_bytes(cat[40..44].try_into().unwrap()), 512);
        assert_eq!(u16::from_le_bytes([cat[38], cat[39]]), 15 * 2048);
        // Root: ., .., then BOOT.CAT, EFI.IMG, ROOT.IMG in order.
        let root = &b[at(ROOT)..at(ROOT) + 2048];
        let mut names = Vec::new();
        let mut p = 0;
        while root[p] != 0 {
            let n = root[p + 32] as usize;
            names.push(root[p + 33..p + 33 + n].to_vec());
            p += root[p] as usize;
        }
        assert_eq!(
            names,
            vec![
                vec![0],
                vec![1],
                b"BOOT.CAT;1".to_vec(),
                b"EFI.IMG;1".to_vec(),
                b"ROOT.IMG;1".to_vec()
            ]
        );
        assert!(root.windows(2).any(|w| w == b"SP"));
        // Read back (at its place in an image): the names, places, boot.
        let mut image = vec![0u8; 32768];
        image.extend(&b);
        let found = read(&mut std::io::Cursor::new(image)).unwrap().unwrap();
        assert_eq!(found.volume_id, "NIXOS_ISO");
        let names: Vec<_> = found.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["boot.cat", "efi.img", "root.img"]);
        assert_eq!(
            (found.files[1].start, found.files[1].len),
            (1 << 20, 15 << 20)
        );
        assert_eq!(found.efi_boot, Some(1 << 20));
        assert_eq!(
            read(&mut std::io::Cursor::new(vec![0u8; 40000])).unwrap(),
            None
        );
    }

    #[test]
    fn mutated_volumes_never_panic_the_reader() {
        let mut base = vec![0u8; 32768];
        base.extend(volume().encode().unwrap());
        crate::fuzz::run("iso9660::read", 2000, |r| {
            let mut b = base.clone();
            // The descriptors, the root directory and the catalog.
            for _ in 0..r.below(8) {
                let i = 32768 + [0, 8 * 2048, 10 * 2048][r.below(3)] + r.below(2048);
                b[i] = r.word() as u8;
            }
            r.mutate(&mut b, 2);
            let _ = read(&mut std::io::Cursor::new(&b));
        });
    }

    #[test]
    fn a_file_over_4_gib_takes_several_extents() {
        let mut v = volume();
        v.size = 10 << 30;
        v.files[0].len = 9 << 30;
        let b = v.encode().unwrap();
        let root = &b[(ROOT as usize - 16) * 2048..][..2048];
        let mut p = 0;
        let mut root_extents = Vec::new();
        while root[p] != 0 {
            if &root[p + 33..p + 33 + 10] == b"ROOT.IMG;1" {
                let len = u32::from_le_bytes(root[p + 10..p + 14].try_into().unwrap());
                root_extents.push((len, root[p + 25] & 0x80 != 0));
            }
            p += root[p] as usize;
        }
        let total: u64 = root_extents.iter().map(|e| e.0 as u64).sum();
        assert_eq!(total, 9 << 30);
        assert_eq!(root_extents.len(), 3);
        assert!(root_extents[..2].iter().all(|e| e.1) && !root_extents[2].1);
        let mut image = vec![0u8; 32768];
        image.extend(&b);
        let found = read(&mut std::io::Cursor::new(image)).unwrap().unwrap();
        assert_eq!(found.files[2].len, 9 << 30);
    }

    #[test]
    fn bad_names_sizes_and_places_are_errors() {
        let mut v = volume();
        v.files[0].name = "Root.img".into();
        assert!(v.encode().is_err());
        let mut v = volume();
        v.files[1].start = 40_000;
        assert!(v.encode().unwrap_err().to_string().contains("efi.img"));
        let mut v = volume();
        v.size += 1;
        assert!(v.encode().is_err());
        let mut v = volume();
        v.volume_id = "nixos".into();
        assert!(v.encode().is_err());
    }
}
