//! Power loss, in the style of ALICE ("All File Systems Are Not Created
//! Equal", OSDI 2014): the file-system calls of a child's whole life with a
//! store are recorded with strace, and crash states are rebuilt from them.
//!
//! In a crash state cut at some point of the trace, each file holds what was
//! synced (fsync or fdatasync) before the cut, and each page written since is
//! as it was at some random moment since (a page is written back whole, so it
//! holds a prefix of the writes that touched it; pages are independent of
//! each other; a page never written back is a hole where the file grew); a
//! length change since the sync is kept or not. A directory
//! holds the entries it had when it was last synced: a created, renamed or
//! deleted name counts only once its directory was synced, and a directory
//! that was never synced in its parent is not there at all. It does not
//! model torn sectors inside a page, nor a file system that makes more
//! durable than was synced (ext4 commits all earlier metadata with any fsync),
//! so it is weaker than ext4 in some ways and stronger in others.
//!
//! Each state is written out, opened as a store, and must hold every entry the
//! child acknowledged before the cut, as written. No state may fail to open:
//! a false corruption report is a failure too.
//!
//! `KYTHIRA_POWER_STATES` (default 400) sets how many states are checked,
//! `KYTHIRA_POWER_SEED` the seed; a failure keeps its state and traces and
//! prints how to replay it (`KYTHIRA_POWER_REPLAY`). `just crash-long` runs
//! many more.

#[path = "../src/bin/storage-crash-child/model.rs"]
#[allow(
    dead_code,
    reason = "shared with the crash test; only entries are used here"
)]
mod model;

use kythira_storage::{FjallStore, LogStore};
use std::{
    collections::{BTreeMap, HashMap},
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

const PAGE: u64 = 4096;

/// One recorded call that matters to what a crash leaves on disk.
#[derive(Clone, Debug)]
enum Call {
    Open {
        fd: i32,
        path: PathBuf,
        create: bool,
        trunc: bool,
        append: bool,
    },
    Write {
        fd: i32,
        path: PathBuf,
        data: Vec<u8>,
        at: Option<u64>,
    },
    Seek {
        fd: i32,
        to: u64,
    },
    SetLen {
        path: PathBuf,
        len: u64,
    },
    Sync {
        path: PathBuf,
    },
    Mkdir {
        path: PathBuf,
    },
    Rename {
        from: PathBuf,
        to: PathBuf,
    },
    Unlink {
        path: PathBuf,
    },
    Close {
        fd: i32,
    },
    /// The child acknowledged entries up to this index.
    Ack(u64),
    /// The process ended: its descriptors are gone.
    Exit,
}

/// Decodes strace's `-xx` escapes ("\x2f...").
fn unescape(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len() / 4);
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && bytes.get(i + 1) == Some(&b'x') {
            out.push(u8::from_str_radix(&s[i + 2..i + 4], 16).unwrap());
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

fn path_of(s: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(unescape(s)))
}

/// The quoted strings of a call, decoded.
fn strings(args: &str) -> Vec<Vec<u8>> {
    args.split('"').skip(1).step_by(2).map(unescape).collect()
}

/// The descriptor and its path from "5<\x2f...>".
fn fd_and_path(arg: &str) -> Option<(i32, PathBuf)> {
    let (fd, rest) = arg.split_once('<')?;
    Some((fd.trim().parse().ok()?, path_of(rest.split('>').next()?)))
}

/// Parses an strace log (`-f -y -xx -s N`); unfinished calls are joined with
/// their resumption, failed calls are dropped.
fn parse(trace: &str) -> Vec<Call> {
    let mut unfinished: HashMap<String, String> = HashMap::new();
    let mut calls = Vec::new();
    for raw in trace.lines() {
        let Some((pid, rest)) = raw.split_once(' ') else {
            continue;
        };
        let rest = rest.trim_start();
        let line = if let Some(head) = rest.strip_suffix(" <unfinished ...>") {
            unfinished.insert(pid.to_owned(), head.to_owned());
            continue;
        } else if rest.starts_with("<... ") {
            let tail = rest.split_once("resumed>").map_or("", |(_, t)| t);
            format!("{}{tail}", unfinished.remove(pid).unwrap_or_default())
        } else {
            rest.to_owned()
        };
        let Some((name, after)) = line.split_once('(') else {
            continue;
        };
        // strace pads short calls: ")      = 0".
        let Some((args, result)) = after
            .rsplit_once(" = ")
            .and_then(|(args, result)| Some((args.trim_end().strip_suffix(')')?, result)))
        else {
            continue;
        };
        let result = result.trim();
        if result.starts_with('-') || result.starts_with('?') {
            continue;
        }
        let first = args.split(", ").next().unwrap_or("");
        let call = match name {
            "openat" => {
                let path = path_of(std::str::from_utf8(&strings(args)[0]).unwrap_or(""));
                let Some((fd, _)) = fd_and_path(result) else {
                    continue;
                };
                Call::Open {
                    fd,
                    path,
                    create: args.contains("O_CREAT"),
                    trunc: args.contains("O_TRUNC"),
                    append: args.contains("O_APPEND"),
                }
            }
            "write" | "pwrite64" => {
                let Some((fd, path)) = fd_and_path(first) else {
                    continue;
                };
                let data = strings(args).remove(0);
                let written: usize = result.parse().unwrap();
                let data = data[..written].to_vec();
                if fd == 1 {
                    let text = String::from_utf8_lossy(&data).into_owned();
                    if let Some(index) = text.trim().strip_prefix("A ") {
                        calls.push(Call::Ack(index.parse().unwrap()));
                    }
                    continue;
                }
                let at = (name == "pwrite64")
                    .then(|| args.rsplit(", ").next().unwrap().trim().parse().unwrap());
                Call::Write { fd, path, data, at }
            }
            "lseek" => {
                let Some((fd, _)) = fd_and_path(first) else {
                    continue;
                };
                Call::Seek {
                    fd,
                    to: result.parse().unwrap(),
                }
            }
            "ftruncate" => {
                let Some((_, path)) = fd_and_path(first) else {
                    continue;
                };
                let len = args.rsplit(", ").next().unwrap().trim().parse().unwrap();
                Call::SetLen { path, len }
            }
            "fsync" | "fdatasync" => {
                let Some((_, path)) = fd_and_path(first) else {
                    continue;
                };
                Call::Sync { path }
            }
            "mkdir" | "mkdirat" => {
                let s = strings(args);
                Call::Mkdir {
                    path: path_of(std::str::from_utf8(&s[0]).unwrap()),
                }
            }
            "rename" | "renameat" | "renameat2" => {
                let s = strings(args);
                Call::Rename {
                    from: path_of(std::str::from_utf8(&s[0]).unwrap()),
                    to: path_of(std::str::from_utf8(&s[1]).unwrap()),
                }
            }
            "unlink" | "unlinkat" => {
                let s = strings(args);
                Call::Unlink {
                    path: path_of(std::str::from_utf8(&s[0]).unwrap()),
                }
            }
            "close" => {
                let Some((fd, _)) = fd_and_path(first) else {
                    continue;
                };
                Call::Close { fd }
            }
            _ => continue,
        };
        calls.push(call);
    }
    calls
}

/// A file's bytes, sparse: pages that were never written are zeros.
#[derive(Clone, Debug, Default)]
struct Bytes {
    len: u64,
    pages: BTreeMap<u64, Box<[u8]>>,
}

impl Bytes {
    fn write(&mut self, at: u64, data: &[u8]) {
        let mut pos = at;
        let end = at + data.len() as u64;
        while pos < end {
            let page = pos / PAGE;
            let page_end = ((page + 1) * PAGE).min(end);
            let bytes = self
                .pages
                .entry(page)
                .or_insert_with(|| vec![0; PAGE as usize].into_boxed_slice());
            let from = (pos - page * PAGE) as usize;
            let src = (pos - at) as usize..(page_end - at) as usize;
            bytes[from..from + src.len()].copy_from_slice(&data[src]);
            pos = page_end;
        }
        self.len = self.len.max(end);
    }

    fn set_len(&mut self, len: u64) {
        if len < self.len {
            self.pages.split_off(&len.div_ceil(PAGE));
            if let Some(last) = self.pages.get_mut(&(len / PAGE)) {
                last[(len % PAGE) as usize..].fill(0);
            }
        }
        self.len = len;
    }

    /// Writes the bytes to `path` as a sparse file.
    fn write_to(&self, path: &Path) {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::create(path).unwrap();
        file.set_len(self.len).unwrap();
        for (page, bytes) in &self.pages {
            let at = page * PAGE;
            let len = (self.len - at).min(PAGE) as usize;
            file.write_all_at(&bytes[..len], at).unwrap();
        }
    }
}

/// A file as synced, now, and the changes between.
#[derive(Clone, Debug, Default)]
struct File {
    synced: Bytes,
    current: Bytes,
    /// Writes and length changes since the last sync, in order.
    pending: Vec<Change>,
}

#[derive(Clone, Debug)]
enum Change {
    Write { at: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    File(usize),
    Dir,
}

/// A directory's entries as last synced, and now.
#[derive(Clone, Debug, Default)]
struct Dir {
    synced: BTreeMap<Vec<u8>, Entry>,
    current: BTreeMap<Vec<u8>, Entry>,
}

/// The file system as the calls so far leave it, under `root`.
struct Fs {
    root: PathBuf,
    files: Vec<File>,
    dirs: HashMap<PathBuf, Dir>,
    /// Each open descriptor's offset, and whether it appends (writes at the
    /// end of the file whatever the offset). strace names threads, which
    /// share descriptors, so they are keyed by number within a process.
    offsets: HashMap<i32, (u64, bool)>,
}

fn split(path: &Path) -> (PathBuf, Vec<u8>) {
    use std::os::unix::ffi::OsStrExt;
    (
        path.parent().unwrap().to_path_buf(),
        path.file_name().unwrap().as_bytes().to_vec(),
    )
}

impl Fs {
    fn new(root: &Path) -> Self {
        let mut dirs = HashMap::new();
        // The directory the store is created in exists, synced and empty.
        dirs.insert(root.to_path_buf(), Dir::default());
        Self {
            root: root.to_path_buf(),
            files: Vec::new(),
            dirs,
            offsets: HashMap::new(),
        }
    }

    fn inode(&self, path: &Path) -> Option<usize> {
        let (parent, name) = split(path);
        match self.dirs.get(&parent)?.current.get(&name)? {
            Entry::File(ino) => Some(*ino),
            Entry::Dir => None,
        }
    }

    fn apply(&mut self, call: &Call) {
        match call {
            Call::Open {
                fd,
                path,
                create,
                trunc,
                append,
            } => {
                if !path.starts_with(&self.root) {
                    return;
                }
                let ino = match self.inode(path) {
                    Some(ino) => ino,
                    None if *create => {
                        let (parent, name) = split(path);
                        let Some(dir) = self.dirs.get_mut(&parent) else {
                            return;
                        };
                        self.files.push(File::default());
                        let ino = self.files.len() - 1;
                        dir.current.insert(name, Entry::File(ino));
                        ino
                    }
                    None => return,
                };
                if *trunc {
                    self.set_len(ino, 0);
                }
                self.offsets.insert(*fd, (0, *append));
            }
            Call::Write { fd, path, data, at } => {
                let Some(ino) = self.inode(path) else { return };
                let len = self.files[ino].current.len;
                let (offset, append) = self.offsets.entry(*fd).or_insert((0, false));
                let at = match at {
                    Some(at) => *at,
                    None => {
                        let at = if *append { len } else { *offset };
                        *offset = at + data.len() as u64;
                        at
                    }
                };
                let file = &mut self.files[ino];
                file.current.write(at, data);
                file.pending.push(Change::Write {
                    at,
                    data: data.clone(),
                });
            }
            Call::Seek { fd, to } => {
                self.offsets.entry(*fd).or_insert((0, false)).0 = *to;
            }
            Call::SetLen { path, len } => {
                if let Some(ino) = self.inode(path) {
                    self.set_len(ino, *len);
                }
            }
            Call::Sync { path } => {
                if let Some(dir) = self.dirs.get_mut(path) {
                    dir.synced = dir.current.clone();
                } else if let Some(ino) = self.inode(path) {
                    let file = &mut self.files[ino];
                    file.synced = file.current.clone();
                    file.pending.clear();
                }
            }
            Call::Mkdir { path } => {
                let (parent, name) = split(path);
                if let Some(dir) = self.dirs.get_mut(&parent) {
                    dir.current.insert(name, Entry::Dir);
                    self.dirs.insert(path.clone(), Dir::default());
                }
            }
            Call::Rename { from, to } => {
                let (from_dir, from_name) = split(from);
                let (to_dir, to_name) = split(to);
                let Some(entry) = self
                    .dirs
                    .get_mut(&from_dir)
                    .and_then(|d| d.current.remove(&from_name))
                else {
                    return;
                };
                assert!(
                    matches!(entry, Entry::File(_)),
                    "directories are not renamed"
                );
                self.dirs
                    .get_mut(&to_dir)
                    .unwrap()
                    .current
                    .insert(to_name, entry);
            }
            Call::Unlink { path } => {
                let (parent, name) = split(path);
                if let Some(dir) = self.dirs.get_mut(&parent) {
                    dir.current.remove(&name);
                }
            }
            Call::Close { fd } => {
                self.offsets.remove(fd);
            }
            Call::Ack(_) => {}
            Call::Exit => self.offsets.clear(),
        }
    }

    fn set_len(&mut self, ino: usize, len: u64) {
        let file = &mut self.files[ino];
        file.current.set_len(len);
        file.pending.push(Change::SetLen(len));
    }

    /// Writes one crash state of the file system under `out` (which stands
    /// for `root`), choosing the fate of each unsynced page with `rng`.
    fn crash_state(&self, out: &Path, rng: &mut fastrand::Rng) {
        std::fs::create_dir_all(out).unwrap();
        self.write_dir(&self.root, out, rng);
    }

    fn write_dir(&self, dir: &Path, out: &Path, rng: &mut fastrand::Rng) {
        use std::os::unix::ffi::OsStrExt;
        for (name, entry) in &self.dirs[dir].synced {
            let name = std::ffi::OsStr::from_bytes(name);
            match entry {
                Entry::Dir => {
                    std::fs::create_dir(out.join(name)).unwrap();
                    self.write_dir(&dir.join(name), &out.join(name), rng);
                }
                Entry::File(ino) => {
                    self.files[*ino].after_crash(rng).write_to(&out.join(name));
                }
            }
        }
    }
}

impl File {
    /// What the file holds after a crash: the synced bytes, then each page
    /// of each later change kept or lost at random, in order.
    fn after_crash(&self, rng: &mut fastrand::Rng) -> Bytes {
        // A page is written back whole, as it was at some moment: each page
        // keeps a prefix of the writes that touched it, chosen at random,
        // and pages are independent of each other.
        let chunks = |at: u64, len: u64| {
            let end = at + len;
            std::iter::successors(Some(at), move |pos| {
                let next = (pos / PAGE + 1) * PAGE;
                (next < end).then_some(next)
            })
            .map(move |pos| (pos, ((pos / PAGE + 1) * PAGE).min(end)))
        };
        let mut touches: HashMap<u64, usize> = HashMap::new();
        for change in &self.pending {
            if let Change::Write { at, data } = change {
                for (pos, _) in chunks(*at, data.len() as u64) {
                    *touches.entry(pos / PAGE).or_default() += 1;
                }
            }
        }
        let mut kept: Vec<(u64, usize)> = touches.into_iter().collect();
        kept.sort_unstable();
        let kept: HashMap<u64, usize> = kept
            .into_iter()
            .map(|(page, n)| (page, rng.usize(..=n)))
            .collect();
        let mut seen: HashMap<u64, usize> = HashMap::new();
        let mut bytes = self.synced.clone();
        for change in &self.pending {
            match change {
                Change::SetLen(len) => {
                    if rng.bool() {
                        bytes.set_len(*len);
                    }
                }
                Change::Write { at, data } => {
                    for (pos, end) in chunks(*at, data.len() as u64) {
                        let page = pos / PAGE;
                        let ordinal = seen.entry(page).or_default();
                        if *ordinal < kept[&page] {
                            bytes.write(pos, &data[(pos - at) as usize..(end - at) as usize]);
                        }
                        *ordinal += 1;
                    }
                }
            }
        }
        bytes
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs one life of the child under strace: open the store in `root/db`,
/// append one entry per write up to `last`, close.
fn traced_life(root: &Path, last: u64, log: &Path) -> String {
    let mut child = Command::new("strace")
        .args(["-f", "-y", "-xx", "-s", "10000000", "-qq", "-o"])
        .arg(log)
        .args([
            "-e",
            "trace=openat,write,pwrite64,lseek,ftruncate,fsync,fdatasync,mkdir,mkdirat,\
             rename,renameat,renameat2,unlink,unlinkat,close",
        ])
        .arg(env!("CARGO_BIN_EXE_storage-crash-child"))
        .args([
            "faults",
            root.join("db").to_str().unwrap(),
            &last.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("strace runs (just test installs it)");
    writeln!(child.stdin.take().unwrap(), "go").unwrap();
    assert!(child.wait().unwrap().success());
    std::fs::read_to_string(log).unwrap()
}

#[test]
fn every_acknowledged_write_survives_every_crash_state() {
    let states = env_u64("KYTHIRA_POWER_STATES", 400);
    let seed = env_u64("KYTHIRA_POWER_SEED", 0x706f_7765);
    let work = tempfile::Builder::new()
        .prefix("power-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let root = work.path().join("life");
    std::fs::create_dir(&root).unwrap();
    // Two lives: a new store written and closed (its memtables flushed to
    // tables), then reopened and written again.
    // A failure is replayed from its kept traces and seed: the traces of a
    // new run differ (threads), the crash states drawn from them do not.
    let replay = std::env::var_os("KYTHIRA_POWER_REPLAY").map(PathBuf::from);
    let life = |n: u64, last: u64| match &replay {
        Some(dir) => std::fs::read_to_string(dir.join(format!("trace-{n}"))).unwrap(),
        None => traced_life(&root, last, &work.path().join(format!("trace-{n}"))),
    };
    let (trace_1, trace_2) = (life(1, 30), life(2, 60));
    if replay.is_some() {
        // Kept beside a failing state like the traces of a new run.
        std::fs::write(work.path().join("trace-1"), &trace_1).unwrap();
        std::fs::write(work.path().join("trace-2"), &trace_2).unwrap();
    }
    // The traces name the directory they were recorded in.
    let recorded = match &replay {
        Some(dir) => dir.join("life"),
        None => root.clone(),
    };
    let mut calls = parse(&trace_1);
    calls.push(Call::Exit);
    calls.extend(parse(&trace_2));
    if let Ok(path) = std::env::var("KYTHIRA_POWER_DUMP") {
        let text: Vec<String> = calls
            .iter()
            .enumerate()
            .map(|(i, c)| match c {
                Call::Write { path, data, at, .. } => {
                    format!(
                        "{i} write {} {} bytes at {at:?}",
                        path.display(),
                        data.len()
                    )
                }
                other => format!("{i} {other:?}"),
            })
            .collect();
        std::fs::write(path, text.join("\n")).unwrap();
    }
    assert!(
        calls.iter().any(|c| matches!(c, Call::Ack(60))),
        "the child wrote everything"
    );

    let mut rng = fastrand::Rng::with_seed(seed);
    // Cut points in order, so the file system is built up once.
    let mut cuts: Vec<usize> = (0..states).map(|_| rng.usize(..=calls.len())).collect();
    cuts.sort_unstable();
    let (mut checked_writes, mut opened) = (0u64, 0u64);
    let mut fs = Fs::new(&recorded);
    let (mut applied, mut acked) = (0, 0);
    for (state, cut) in cuts.into_iter().enumerate() {
        for call in &calls[applied..cut] {
            fs.apply(call);
            if let Call::Ack(index) = call {
                acked = *index;
            }
        }
        applied = cut;
        if let Ok(needle) = std::env::var("KYTHIRA_POWER_DEBUG") {
            for (i, call) in calls[..cut].iter().enumerate() {
                let text = match call {
                    Call::Write { path, data, .. } => {
                        format!("write {} {}", path.display(), data.len())
                    }
                    other => format!("{other:?}"),
                };
                if text.contains(&needle) {
                    eprintln!("{i}: {text}");
                }
            }
            for (dir, d) in &fs.dirs {
                if dir.to_string_lossy().contains(&needle) {
                    let names = |m: &BTreeMap<Vec<u8>, Entry>| -> Vec<String> {
                        m.iter()
                            .map(|(k, v)| format!("{}={v:?}", String::from_utf8_lossy(k)))
                            .collect()
                    };
                    eprintln!(
                        "{}: synced {:?} current {:?}",
                        dir.display(),
                        names(&d.synced),
                        names(&d.current)
                    );
                }
            }
        }
        let out = work.path().join(format!("state-{state}"));
        fs.crash_state(&out, &mut rng);
        let db = out.join("db");
        if acked == 0 && !db.exists() {
            // Nothing acknowledged and nothing durable yet: a new store.
            std::fs::remove_dir_all(&out).unwrap();
            continue;
        }
        let store = match FjallStore::open(&db) {
            Ok(store) => store,
            Err(e) => {
                // The state and the traces stay for a look: a trace differs
                // from run to run (threads), so the seed alone does not
                // replay it.
                let kept = work.keep().display().to_string();
                let total = calls.len();
                panic!(
                    "state {state} (seed {seed}, cut {cut} of {total}, {acked} acknowledged): \
                     {e}; the state and the traces are kept in {kept} \
                     (KYTHIRA_POWER_REPLAY={kept} KYTHIRA_POWER_SEED={seed} replays it)"
                )
            }
        };
        opened += 1;
        assert!(
            store.last_index() >= acked,
            "state {state} (seed {seed}, cut {cut}): {acked} acknowledged, {} kept",
            store.last_index()
        );
        for index in 1..=acked {
            assert_eq!(
                store.entry(index).unwrap(),
                model::mixed_entry(index),
                "state {state}: entry {index}"
            );
        }
        checked_writes += acked;
        drop(store);
        std::fs::remove_dir_all(&out).unwrap();
    }
    // Reached only if every state opened and held every acknowledged write.
    println!(
        "POWER states={states} opened={opened} acknowledged_writes_checked={checked_writes} \
         calls={}",
        calls.len()
    );
}
