#if canImport(Glibc)
import Glibc
#endif

/// Open-file-description locks on the bytes QEMU uses for image locking (raw-posix:
/// permission bytes at 100+bit, "not shared" bytes at 200+bit), so rawmount, qemu-img,
/// qemu-nbd and qemu-storage-daemon see each other's writers.
public enum ImageLock {
    // QEMU permission bits: consistent read, write, write-unchanged, resize.
    static let consistentRead = 0, write = 1, writeUnchanged = 2, resize = 3
    static let permBase: Int64 = 100, sharedBase: Int64 = 200
    static let F_OFD_GETLK: Int32 = 36, F_OFD_SETLK: Int32 = 37

    /// Takes the locks for a reader (shares nothing but reads) or a writer (refuses other
    /// writers and resizers). Throws `.locked` naming the conflict.
    public static func acquire(_ file: ImageFile, writable: Bool) throws {
        let held: [Int] = writable ? [consistentRead, write, writeUnchanged] : [consistentRead]
        let refused: [Int] = [write, resize]
        // One test over every byte that could conflict usually finds nothing at all (a split
        // VMDK locks thousands of files); only when it finds a lock are the bytes told apart.
        let tested = held.map { sharedBase + Int64($0) } + refused.map { permBase + Int64($0) }
        let span = tested.min()! ... tested.max()!
        if try isLockedByOther(file, bytes: span) {
            try refuseConflicts(file, held: held, refused: refused)
        }
        for p in held { try lock(file, byte: permBase + Int64(p)) }
        for p in refused { try lock(file, byte: sharedBase + Int64(p)) }
    }

    private static func refuseConflicts(_ file: ImageFile, held: [Int], refused: [Int]) throws {
        for p in held where try isLockedByOther(file, byte: sharedBase + Int64(p)) {
            throw BlockError.locked(file: file.path, detail: "another process does not allow \(name(p))")
        }
        for p in refused where try isLockedByOther(file, byte: permBase + Int64(p)) {
            throw BlockError.locked(file: file.path,
                                    detail: "another process has it open for \(name(p))")
        }
    }

    static func name(_ p: Int) -> String {
        switch p { case write: return "writing"; case resize: return "resizing"; default: return "reading" }
    }

    static func lock(_ file: ImageFile, byte: Int64) throws {
        var fl = flock()
        fl.l_type = Int16(F_RDLCK)
        fl.l_whence = Int16(SEEK_SET)
        fl.l_start = off_t(byte)
        fl.l_len = 1
        if fcntl(file.fd, F_OFD_SETLK, &fl) != 0 {
            let e = errno
            if e == EAGAIN || e == EACCES {
                throw BlockError.locked(file: file.path, detail: "lock byte \(byte) is held by another process")
            }
            if e == EINVAL || e == ENOLCK { return } // file system without OFD locks: go on unlocked
            throw BlockError.io(file: file.path, operation: "lock", offset: UInt64(byte), errno: e)
        }
    }

    static func isLockedByOther(_ file: ImageFile, byte: Int64) throws -> Bool {
        try isLockedByOther(file, bytes: byte ... byte)
    }

    /// Whether another open file holds a lock on any byte of `bytes`.
    static func isLockedByOther(_ file: ImageFile, bytes: ClosedRange<Int64>) throws -> Bool {
        let byte = bytes.lowerBound
        var fl = flock()
        fl.l_type = Int16(F_WRLCK)
        fl.l_whence = Int16(SEEK_SET)
        fl.l_start = off_t(byte)
        fl.l_len = off_t(bytes.count)
        if fcntl(file.fd, F_OFD_GETLK, &fl) != 0 {
            if errno == EINVAL || errno == ENOLCK { return false }
            throw BlockError.io(file: file.path, operation: "lock test", offset: UInt64(byte), errno: errno)
        }
        return fl.l_type != Int16(F_UNLCK)
    }
}
