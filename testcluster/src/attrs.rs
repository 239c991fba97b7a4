//! File attributes, as `chattr` sets them: through the `FS_IOC_GETFLAGS` and `FS_IOC_SETFLAGS`
//! ioctls on the file itself.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

/// `FS_IMMUTABLE_FL` of `<linux/fs.h>` (`chattr +i`), which the libc crate does not define.
const IMMUTABLE: libc::c_int = 0x10;

/// Makes `dir` immutable (`chattr +i`), so that nothing, not even root, can create a file in
/// it, for as long as the value lives.
pub struct Immutable<'a>(&'a Path);

impl<'a> Immutable<'a> {
    /// Sets the attribute on `dir`; fails the test where the file system has no such attribute.
    pub fn new(dir: &'a Path) -> Self {
        set_immutable(dir, true).unwrap_or_else(|e| panic!("chattr +i {}: {e}", dir.display()));
        Immutable(dir)
    }
}

impl Drop for Immutable<'_> {
    fn drop(&mut self) {
        if let Err(e) = set_immutable(self.0, false) {
            eprintln!("chattr -i {}: {e}", self.0.display());
        }
    }
}

/// Sets or clears the immutable attribute of `path`, keeping its other attributes.
fn set_immutable(path: &Path, on: bool) -> std::io::Result<()> {
    let file = File::open(path)?;
    // An int, as the kernel reads and writes it (and chattr passes it), whatever the ioctl's name
    // says.
    let mut flags: libc::c_int = 0;
    // SAFETY: both ioctls take a pointer to a flag word, which `flags` is and outlives the call.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    flags = if on { flags | IMMUTABLE } else { flags & !IMMUTABLE };
    // SAFETY: as above.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::FS_IOC_SETFLAGS, &flags) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
