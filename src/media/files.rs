//! The files of the media repository: one flat directory, `media/` beside the database.
//!
//! Every name in it is chosen here (random alphanumerics), never taken from a request, so no
//! request can name a path. A file becomes durable in this order: written to `.tmp-<random>`,
//! fsynced, renamed to its final name, the directory fsynced; only then does the caller
//! commit the row that names it (and answers after that commit). Until the caller says
//! [`Stored::keep`], dropping the handle removes the file (a failed or cancelled upload leaves
//! nothing). A kill between the rename and the commit leaves a file with no row: the start-up
//! [`Files::sweep`] removes it. So there is never a row without its file, and orphan files
//! last at most until the next start.
//!
//! All file I/O runs on the blocking thread pool (`smol::unblock`, `smol::Unblock`), never on
//! the executor thread.

use std::{
    collections::HashSet,
    fs::{self, File},
    io::{self, Write},
    path::{Path, PathBuf},
    time::SystemTime,
};

use futures_lite::{io::BufReader, AsyncRead, AsyncReadExt, AsyncWriteExt};
use rand::{distributions::Alphanumeric, Rng};

use crate::error::{Error, Result};

const TMP_PREFIX: &str = ".tmp-";

/// Chunk size for streaming bodies to and from disk.
const CHUNK: usize = 64 * 1024;

/// A random name of `len` ASCII letters and digits.
pub fn random_name(len: usize) -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

fn io_error(what: &str, e: io::Error) -> Error {
    Error::internal(format_args!("media {what}: {e}"))
}

/// The media directory.
#[derive(Clone, Debug)]
pub struct Files {
    dir: PathBuf,
}

/// A file in the media directory that is removed when dropped, unless kept.
struct Guard {
    path: Option<PathBuf>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            // On the blocking pool: never an unlink on the executor thread.
            smol::unblock(move || {
                if let Err(e) = fs::remove_file(&path) {
                    if e.kind() != io::ErrorKind::NotFound {
                        log::warn!("media: removing {}: {e}", path.display());
                    }
                }
            })
            .detach();
        }
    }
}

/// A file received completely under a temporary name, not yet durable.
pub struct Received {
    guard: Guard,
    file: File,
    pub size: u64,
}

/// A durable file under its final name, with no row yet: dropped, it is removed.
pub struct Stored {
    guard: Guard,
    pub name: String,
    pub size: u64,
}

impl Stored {
    /// The row naming this file is committed: the file stays.
    pub fn keep(mut self) {
        self.guard.path = None;
    }
}

impl Files {
    /// Creates the directory if needed (at start-up, before serving).
    pub fn open(dir: PathBuf) -> io::Result<Self> {
        fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    /// The path of a stored file. `name` comes from a row (written by this module), never
    /// from a request.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Removes temporary files and files that no row names (`keep`), if they were last
    /// modified before `started` (so a file being committed right now is never touched).
    /// Runs at start-up; returns how many files were removed.
    pub fn sweep(&self, keep: &HashSet<String>, started: SystemTime) -> io::Result<usize> {
        let mut removed = 0;
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let meta = entry.metadata()?;
            if !meta.is_file() || keep.contains(name) {
                continue;
            }
            if meta.modified().is_ok_and(|m| m >= started) {
                continue;
            }
            log::info!("media: removing orphan file {name}");
            fs::remove_file(entry.path())?;
            removed += 1;
        }
        if removed > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(removed)
    }

    async fn create_temp(&self) -> Result<(Guard, File)> {
        let path = self.dir.join(format!("{TMP_PREFIX}{}", random_name(24)));
        let p = path.clone();
        let file = smol::unblock(move || File::options().write(true).create_new(true).open(p))
            .await
            .map_err(|e| io_error("creating a temporary file", e))?;
        Ok((Guard { path: Some(path) }, file))
    }

    /// Streams `body` into a temporary file, refusing more than `limit` bytes with `over`
    /// (while reading: the body is never held in memory whole). With a `length` (the
    /// `Content-Length`), a body that ends short is refused: the HTTP library reports a
    /// client that left mid-body as a plain end of body.
    pub async fn receive(
        &self,
        body: impl AsyncRead + Unpin,
        length: Option<u64>,
        limit: u64,
        over: impl FnOnce() -> Error,
    ) -> Result<Received> {
        let (guard, file) = self.create_temp().await?;
        let mut body = BufReader::with_capacity(CHUNK, body);
        let mut out = smol::Unblock::with_capacity(CHUNK, file);
        let mut buf = vec![0u8; CHUNK];
        let mut size = 0u64;
        loop {
            let n = body
                .read(&mut buf)
                .await
                .map_err(|e| Error::new(400, "M_UNKNOWN", format!("reading the upload: {e}")))?;
            if n == 0 {
                break;
            }
            size += n as u64;
            if size > limit {
                return Err(over());
            }
            out.write_all(&buf[..n])
                .await
                .map_err(|e| io_error("writing", e))?;
        }
        if length.is_some_and(|l| l != size) {
            return Err(Error::new(
                400,
                "M_UNKNOWN",
                "The upload ended before its Content-Length",
            ));
        }
        out.flush().await.map_err(|e| io_error("writing", e))?;
        let file = out.into_inner().await;
        Ok(Received { guard, file, size })
    }

    /// Writes `bytes` (a thumbnail, a fetched remote file) into a temporary file.
    pub async fn receive_bytes(&self, bytes: Vec<u8>) -> Result<Received> {
        let (guard, mut file) = self.create_temp().await?;
        let size = bytes.len() as u64;
        let file = smol::unblock(move || file.write_all(&bytes).map(|()| file))
            .await
            .map_err(|e| io_error("writing", e))?;
        Ok(Received { guard, file, size })
    }

    /// Makes a received file durable under a new final name: fsync, rename, directory fsync.
    pub async fn store(&self, received: Received) -> Result<Stored> {
        let Received {
            mut guard,
            file,
            size,
        } = received;
        let tmp = guard
            .path
            .take()
            .ok_or_else(|| Error::internal("media: no file"))?;
        let name = random_name(32);
        let target = self.dir.join(&name);
        let dir = self.dir.clone();
        let (tmp2, target2) = (tmp.clone(), target.clone());
        let done = smol::unblock(move || {
            file.sync_all()?;
            drop(file);
            fs::rename(&tmp2, &target2)?;
            sync_dir(&dir)
        })
        .await;
        match done {
            Ok(()) => Ok(Stored {
                guard: Guard { path: Some(target) },
                name,
                size,
            }),
            Err(e) => {
                // Whichever name it has now, it goes (a missing one is ignored).
                guard.path = Some(tmp);
                drop(Guard { path: Some(target) });
                Err(io_error("storing", e))
            }
        }
    }

    /// Opens a stored file for streaming out: the reader and the file's length.
    pub async fn open_file(
        &self,
        name: &str,
    ) -> Result<(
        impl futures_lite::AsyncBufRead + Unpin + Send + Sync + 'static,
        u64,
    )> {
        let path = self.path(name);
        let (file, len) = smol::unblock(move || {
            let file = File::open(&path)?;
            let len = file.metadata()?.len();
            Ok::<_, io::Error>((file, len))
        })
        .await
        .map_err(|e| io_error("opening", e))?;
        let reader = async_dup::Mutex::new(smol::Unblock::with_capacity(CHUNK, file));
        Ok((BufReader::with_capacity(CHUNK, reader), len))
    }

    /// Reads a stored file whole (thumbnail sources, federation answers) on the blocking pool.
    pub async fn read(&self, name: &str) -> Result<Vec<u8>> {
        let path = self.path(name);
        smol::unblock(move || fs::read(path))
            .await
            .map_err(|e| io_error("reading", e))
    }
}

/// Makes a rename or removal in `dir` durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
