import BlockEngine
#if canImport(Glibc)
import Glibc
#endif

/// The one policy for files an image names: VMDK extents, backing files, VMDK and VDI
/// parents, Bochs bases and lower layers. Every byte of an image is someone else's choice,
/// so what it names is opened like this:
/// - only regular files and block devices, opened without waiting (`ImageFile`);
/// - backing files, parents, bases and layers: always read-only, wherever they are (QEMU and
///   Bochs follow such names too), and never one already in the chain (a loop);
/// - extents (part of the image itself): writable only when the file actually opened, every
///   symlink resolved, lies inside the folder of the descriptor that names it; one outside
///   (a link to /elsewhere/victim.bin) is opened read-only and the image is served read-only.
public enum ReferencedFiles {
    /// Opens `path`, named by the image `referrer`, for writing only if `writable` is asked
    /// and the policy allows it; the returned file's `isWritable` says which it got.
    static func openPart(_ path: String, of referrer: String, writable: Bool, shared: Bool = false) throws -> ImageFile {
        let readOnly = try ImageFile(path: path, writable: false, sharedWithWriters: shared)
        guard writable, isInsideFolder(readOnly, of: referrer) else { return readOnly }
        return try reopenForWriting(readOnly)
    }

    /// The same file opened read-write; a name that now reaches another file (swapped
    /// between the two opens) is refused.
    static func reopenForWriting(_ file: ImageFile) throws -> ImageFile {
        let rw = try ImageFile(path: file.path, writable: true)
        guard rw.isSameFile(as: file) else {
            throw BlockError.invalid(file: file.path, field: "file", detail: "it was replaced by another file while being opened")
        }
        return rw
    }

    /// Whether the file `file` opened (symlinks resolved) lives in the resolved folder of `referrer`.
    public static func isInsideFolder(_ file: ImageFile, of referrer: String) -> Bool {
        guard let real = file.resolvedPath, let folder = resolvedFolder(of: referrer) else { return false }
        let prefix = folder == "/" ? "/" : folder + "/"
        return real.hasPrefix(prefix)
    }

    static func resolvedFolder(of path: String) -> String? {
        guard let p = realpath(PathName.directory(of: path), nil) else { return nil }
        defer { free(p) }
        return String(cString: p)
    }
}
