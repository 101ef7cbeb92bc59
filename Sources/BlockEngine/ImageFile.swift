#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// One open image file. All positioned I/O of the project goes through here: the loops
/// retry short transfers and EINTR, and every failure names the file and offset.
public final class ImageFile: Sendable {
    public let path: String
    public let fd: Int32
    public let isWritable: Bool
    /// Opened without locks next to a writer (`--force-share`): its tables and size can
    /// change under us, so caches expire and the file's end is asked again.
    public let sharedWithWriters: Bool
    /// Bumped after every change to the file, so a remembered hole is trusted only until then.
    private let changes = Atomic<UInt64>(0)
    private let knownHole = Mutex<(start: UInt64, end: UInt64, changes: UInt64, at: Double)?>(nil)

    /// Opens `path`. Read-only opens add O_NOATIME where the kernel allows it, so forensic
    /// reads leave the access time alone. Only regular files and block devices are images:
    /// the open does not wait (O_NONBLOCK, so a FIFO cannot hang it) and anything else is
    /// refused by name before a byte is read.
    /// `named`: the name errors give (a file made under a temporary name, see `createComplete`).
    public init(path: String, writable: Bool, sharedWithWriters: Bool = false, named: String? = nil) throws {
        self.path = named ?? path
        self.isWritable = writable
        self.sharedWithWriters = sharedWithWriters && !writable
        var flags = (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC | O_NONBLOCK | O_NOCTTY
        if !writable { flags |= 0o1000000 /* O_NOATIME */ }
        var fd = open(path, flags)
        if fd < 0 && errno == EPERM && !writable {
            flags &= ~0o1000000  // O_NOATIME needs ownership
            fd = open(path, flags)
        }
        if fd < 0 { throw BlockError.io(file: named ?? path, operation: "open", offset: nil, errno: errno) }
        var st = Glibc.stat()
        guard fstat(fd, &st) == 0 else {
            let e = errno
            close(fd)
            throw BlockError.io(file: path, operation: "fstat", offset: nil, errno: e)
        }
        let type = st.st_mode & S_IFMT
        guard type == S_IFREG || type == S_IFBLK else {
            close(fd)
            if type == S_IFDIR { throw BlockError.io(file: path, operation: "open", offset: nil, errno: EISDIR) }
            throw BlockError.invalid(file: path, field: "file type",
                                     detail: "\(Self.typeName(type)) is not a disk image (only regular files and block devices are)")
        }
        // The status flags are the open's (F_SETFL ignores the access mode): one call, not a
        // get and a set (a split VMDK opens thousands of files).
        _ = fcntl(fd, F_SETFL, flags & ~O_NONBLOCK)
        self.fd = fd
        identity = FileIdentity(device: UInt64(st.st_dev), inode: UInt64(st.st_ino))
        sizeAtOpen = type == S_IFREG ? UInt64(st.st_size) : nil
    }

    /// Grows the process's descriptor table to hold `more` descriptors beyond those open, in
    /// one step. Each growth of a multi-threaded process's table waits for an RCU grace
    /// period (milliseconds), and opening thousands of files (a split VMDK) on several cores
    /// would otherwise grow it eight times over.
    public static func reserveDescriptors(_ more: Int) {
        let probe = dup(2)
        guard probe >= 0 else { return }
        defer { close(probe) }
        let high = fcntl(probe, F_DUPFD_CLOEXEC, Int32(clamping: Int(probe) + more))
        if high >= 0 { close(high) }
    }

    static func typeName(_ type: mode_t) -> String {
        switch type {
        case S_IFIFO: return "a FIFO"
        case S_IFSOCK: return "a socket"
        case S_IFCHR: return "a character device"
        case S_IFLNK: return "a symbolic link"
        default: return "this kind of file"
        }
    }

    /// The path of what this descriptor actually opened (every symlink resolved), as the
    /// kernel records it; nil if it cannot say (deleted file, no /proc).
    public var resolvedPath: String? {
        var buf = [UInt8](repeating: 0, count: 4096)
        let n = buf.withUnsafeMutableBytes { readlink("/proc/self/fd/\(fd)", $0.baseAddress!.assumingMemoryBound(to: CChar.self), 4096) }
        guard n > 0, n < 4096, buf[0] == 0x2F else { return nil }
        let text = String(decoding: buf[0..<n], as: UTF8.self)
        return text.hasSuffix(" (deleted)") ? nil : text
    }

    /// Whether `other` is the same file (device and inode) as this one.
    public func isSameFile(as other: ImageFile) -> Bool {
        guard let a = identity else { return false }
        return a == other.identity
    }

    /// (device, inode): identifies the file whatever name reached it. Taken once at open:
    /// neither changes while the descriptor is open (a split VMDK asks for thousands).
    public let identity: FileIdentity?
    /// A regular file's size when it was opened (from the open's fstat; nil for a block
    /// device): for openers of many files that need it once, right after the open.
    public let sizeAtOpen: UInt64?

    deinit { close(fd) }

    /// Creates a new, empty file (never overwrites) and opens it for writing.
    public static func createNew(path: String, named: String? = nil) throws -> ImageFile {
        let fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw BlockError.io(file: named ?? path, operation: "create", offset: nil, errno: errno) }
        close(fd)
        return try ImageFile(path: path, writable: true, named: named)
    }

    /// Makes a new file at `path` with `fill`, which writes it under a temporary name in the
    /// same folder; the file takes its name only once `fill` returned and it is durable, and
    /// never in place of an existing file. So an error or a kill part way never leaves a
    /// file at `path` that looks like an image and is not one (a kill leaves at most a hidden
    /// `.NAME.rawmount-new-*` beside it).
    public static func createComplete(path: String, _ fill: (ImageFile) throws -> Void) throws {
        if access(path, F_OK) == 0 { throw BlockError.io(file: path, operation: "create", offset: nil, errno: EEXIST) }
        let dir = PathName.directory(of: path)
        let temp = dir + "/." + String(decoding: PathName.baseName(path).utf8.prefix(120), as: UTF8.self) + ".rawmount-new-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let file = try createNew(path: temp, named: path)
        do {
            try fill(file)
            try file.sync()
            // link(2) refuses an existing name; where links are not supported, the name is
            // claimed with O_EXCL first and the new file renamed over that placeholder.
            if link(temp, path) != 0 {
                let e = errno
                guard e == EPERM || e == EOPNOTSUPP || e == EMLINK || e == EXDEV else {
                    throw BlockError.io(file: path, operation: "create", offset: nil, errno: e)
                }
                let claim = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
                guard claim >= 0 else { throw BlockError.io(file: path, operation: "create", offset: nil, errno: errno) }
                close(claim)
                guard rename(temp, path) == 0 else {
                    let e = errno
                    unlink(path)
                    throw BlockError.io(file: path, operation: "create", offset: nil, errno: e)
                }
            }
            unlink(temp)
        } catch {
            unlink(temp)
            throw error
        }
        // The name is durable too (a crash right after must not lose the new file).
        if !syncDisabled.load(ordering: .relaxed) {
            let d = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
            if d >= 0 { _ = fsync(d); close(d) }
        }
    }

    /// `cached` for files only this process changes; for a shared file, the size now (a writer
    /// may have grown it since `cached` was taken).
    public func end(cached: UInt64) -> UInt64 {
        guard sharedWithWriters, let now = try? size() else { return cached }
        return max(now, cached)
    }

    /// Current size in bytes (works for block devices too).
    public func size() throws -> UInt64 {
        let end = lseek(fd, 0, SEEK_END)
        if end < 0 { throw BlockError.io(file: path, operation: "lseek", offset: nil, errno: errno) }
        return UInt64(end)
    }

    /// Reads exactly `buffer.count` bytes; the file ending early is an error naming `what`.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, what: String = "data") throws {
        let got = try readUpTo(into: buffer, at: offset)
        if got < buffer.count {
            throw BlockError.truncated(file: path, what: what, offset: offset, needed: UInt64(buffer.count),
                                       fileSize: (try? size()) ?? offset + UInt64(got))
        }
    }

    /// Reads `head` and then `tail` from the consecutive bytes at `offset`, in one preadv
    /// when it returns them all (a stored chunk and its checksum); the file ending early is
    /// an error naming `what`.
    public func read(into head: UnsafeMutableRawBufferPointer, then tail: UnsafeMutableRawBufferPointer,
                     at offset: UInt64, what: String) throws {
        try read(scatter: [head, tail], at: offset, what: what)
    }

    /// Fills `buffers` in order from the consecutive bytes at `offset`, in one preadv when it
    /// returns them all (a run of stored chunks, each followed by its checksum); the file
    /// ending early is an error naming `what`.
    public func read(scatter buffers: [UnsafeMutableRawBufferPointer], at offset: UInt64, what: String) throws {
        let total = buffers.reduce(0) { $0 + $1.count }
        if buffers.count <= Self.maxIovecs, offset <= UInt64(Int.max) - UInt64(total) {
            // (On the stack: this runs once per stored EWF chunk.)
            let whole = withUnsafeTemporaryAllocation(of: iovec.self, capacity: buffers.count) { iov in
                for (k, b) in buffers.enumerated() { iov[k] = iovec(iov_base: b.baseAddress, iov_len: b.count) }
                return preadv(fd, iov.baseAddress, Int32(buffers.count), off_t(offset)) == total
            }
            if whole { return }
        }
        // Short, interrupted, failed or too many pieces: piece by piece, which reports what
        // went wrong.
        var at = offset
        for b in buffers {
            try read(into: b, at: at, what: what)
            at += UInt64(b.count)
        }
    }

    /// Pieces one preadv takes (Linux's IOV_MAX).
    static let maxIovecs = 1024

    /// Reads until the buffer is full or the file ends; returns the bytes read.
    public func readUpTo(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int {
        guard let base = buffer.baseAddress, buffer.count > 0 else { return 0 }
        guard offset <= UInt64(Int.max) - UInt64(buffer.count) else {
            throw BlockError.io(file: path, operation: "read", offset: offset, errno: EOVERFLOW)
        }
        var done = 0
        while done < buffer.count {
            let n = pread(fd, base + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw BlockError.io(file: path, operation: "read", offset: offset + UInt64(done), errno: errno)
            }
            if n == 0 { break }
            done += n
        }
        return done
    }

    /// Reads, and fills whatever lies past the end of the file with zeros (QEMU's file layer
    /// does the same; callers that must not accept it use `read(into:at:what:)`).
    public func readZeroFilled(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        let got = try readUpTo(into: buffer, at: offset)
        if got < buffer.count, let base = buffer.baseAddress {
            memset(base + got, 0, buffer.count - got)
        }
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        guard let base = buffer.baseAddress, buffer.count > 0 else { return }
        guard isWritable else { throw BlockError.readOnly(file: path) }
        guard offset <= UInt64(Int.max) - UInt64(buffer.count) else {
            throw BlockError.io(file: path, operation: "write", offset: offset, errno: EOVERFLOW)
        }
        var done = 0
        if HostFaults.enabled, let fault = HostFaults.check(.write, path) {
            // A file system that runs out of space stops at a block boundary: the part up to the
            // last 4 KiB boundary before the middle lands (nothing, for a small write).
            let cut = Int((offset + UInt64(buffer.count / 2)).alignedDown(4096)) - Int(offset)
            if fault.short && cut > 0 { done = max(0, pwrite(fd, base, cut, off_t(offset))) }
            throw BlockError.io(file: path, operation: "write", offset: offset + UInt64(done), errno: fault.errno)
        }
        while done < buffer.count {
            let n = pwrite(fd, base + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw BlockError.io(file: path, operation: "write", offset: offset + UInt64(done), errno: errno)
            }
            if n == 0 { throw BlockError.io(file: path, operation: "write", offset: offset + UInt64(done), errno: EIO) }
            done += n
        }
        changes.add(1, ordering: .releasing)
    }

    public func write(_ bytes: [UInt8], at offset: UInt64) throws {
        try bytes.withUnsafeBytes { try write($0, at: offset) }
    }

    /// Reads `count` bytes into a new array (for headers and small structures). The array is
    /// not zeroed first: a short read throws, so no unread byte is ever seen.
    public func readBytes(count: Int, at offset: UInt64, what: String) throws -> [UInt8] {
        try [UInt8](unsafeUninitializedCapacity: count) { buffer, initialized in
            try read(into: UnsafeMutableRawBufferPointer(buffer), at: offset, what: what)
            initialized = count
        }
    }

    /// `rawmount convert -t unsafe` (its default, as qemu-img convert's): a new image that a
    /// crash would leave half-written anyway is not fdatasynced on the way. Never set by mounts.
    public static let syncDisabled = Atomic<Bool>(false)

    /// The errno of the first failed fdatasync (0: none). Once one failed, every later sync
    /// fails too: Linux may have dropped the pages it could not write and reports that only
    /// once, so a later success would not mean the data is on disk. Every ordering barrier
    /// (data before the table naming it) then stops at the failed sync.
    private let syncError = Atomic<Int32>(0)

    func rememberSyncFailure(_ e: Int32) {
        _ = syncError.compareExchange(expected: 0, desired: e, ordering: .acquiringAndReleasing)
    }

    /// Makes written data durable.
    public func sync() throws {
        guard isWritable, !Self.syncDisabled.load(ordering: .relaxed) else { return }
        let earlier = syncError.load(ordering: .acquiring)
        if earlier != 0 {
            throw BlockError.io(file: path, operation: "fdatasync (an earlier one failed)", offset: nil, errno: earlier)
        }
        if HostFaults.enabled, let fault = HostFaults.check(.sync, path) {
            rememberSyncFailure(fault.errno)
            throw BlockError.io(file: path, operation: "fdatasync", offset: nil, errno: fault.errno)
        }
        while fdatasync(fd) != 0 {
            let e = errno
            if e == EINTR { continue }
            rememberSyncFailure(e)
            throw BlockError.io(file: path, operation: "fdatasync", offset: nil, errno: e)
        }
    }

    /// fallocate(2); returns false when the file system does not support `mode`.
    public func fallocate(mode: Int32, offset: UInt64, length: UInt64) throws -> Bool {
        defer { changes.add(1, ordering: .releasing) }
        if isWritable && HostFaults.enabled, let fault = HostFaults.check(.fallocate, path) {
            throw BlockError.io(file: path, operation: "fallocate", offset: offset, errno: fault.errno)
        }
        guard offset <= UInt64(Int64.max), length <= UInt64(Int64.max) - offset else {
            throw BlockError.io(file: path, operation: "fallocate", offset: offset, errno: EFBIG)
        }
        while true {
            if linuxFallocate(fd, mode, off_t(offset), off_t(length)) == 0 { return true }
            let e = errno
            if e == EINTR { continue }
            if e == EOPNOTSUPP || e == ENOSYS || e == EINVAL { return false }
            throw BlockError.io(file: path, operation: "fallocate", offset: offset, errno: e)
        }
    }

    /// Deallocates a host range (it reads as zeros, the file keeps its size); false if unsupported.
    public func punchHole(offset: UInt64, length: UInt64) throws -> Bool {
        try fallocate(mode: Self.fallocPunchHole | Self.fallocKeepSize, offset: offset, length: length)
    }

    /// Zeroes a host range without writing data; false if unsupported.
    public func zeroRange(offset: UInt64, length: UInt64) throws -> Bool {
        try fallocate(mode: Self.fallocZeroRange | Self.fallocKeepSize, offset: offset, length: length)
    }

    static let fallocKeepSize: Int32 = 0x01, fallocPunchHole: Int32 = 0x02, fallocZeroRange: Int32 = 0x10

    /// Makes the file at least `size` bytes without ever shrinking it: a zero byte at
    /// `size - 1` (for space past the old end, which reads as zeros anyway). Unlike a
    /// size check and a truncate, this cannot cut off a write past `size` that another
    /// thread makes at the same time.
    public func extend(to size: UInt64) throws {
        guard size > 0, try self.size() < size else { return }
        try write([0], at: size - 1)
    }

    /// Drops everything from `size` on (a failed write's bytes past the old end); true when
    /// the file now ends at or before `size`.
    public func cutBack(to size: UInt64) -> Bool {
        guard let now = try? self.size() else { return false }
        return now <= size || (try? truncate(to: size)) != nil
    }

    public func truncate(to size: UInt64) throws {
        defer { changes.add(1, ordering: .releasing) }
        if isWritable && HostFaults.enabled, let fault = HostFaults.check(.fallocate, path) {
            throw BlockError.io(file: path, operation: "ftruncate", offset: size, errno: fault.errno)
        }
        guard size <= UInt64(Int64.max) else { throw BlockError.io(file: path, operation: "ftruncate", offset: size, errno: EFBIG) }
        if ftruncate(fd, off_t(size)) != 0 {
            throw BlockError.io(file: path, operation: "ftruncate", offset: size, errno: errno)
        }
    }

    /// The next offset at or after `offset` that holds data (`data: true`) or is a hole in
    /// the host file; nil past the end of the file.
    public func seek(_ offset: UInt64, data: Bool) throws -> UInt64? {
        guard offset <= UInt64(Int64.max) else { return nil }  // past any file's end
        let r = lseek(fd, off_t(offset), data ? 3 /* SEEK_DATA */ : 4 /* SEEK_HOLE */)
        if r < 0 {
            if errno == ENXIO { return nil }
            if errno == EINVAL { return data ? offset : (try size()) } // no support: all data
            throw BlockError.io(file: path, operation: "lseek", offset: offset, errno: errno)
        }
        return UInt64(r)
    }

    /// Whether `[offset, offset+length)` (inside the file) is a hole in the host file, so it
    /// reads as zeros without being read: one SEEK_DATA, whose hole is remembered until the
    /// file next changes (or, next to another writer, for as long as tables are trusted), so
    /// a walk over a run of preallocated, never written tables (QEMU's VMDK grain tables)
    /// costs one system call per run instead of one read per table.
    public func isHole(_ offset: UInt64, length: UInt64) -> Bool { hole(around: offset, length: length) != nil }

    /// The whole hole `[offset, offset+length)` lies in (from `offset` to the next data), or
    /// nil when that range holds data; remembered as `isHole` says.
    public func hole(around offset: UInt64, length: UInt64) -> (start: UInt64, end: UInt64)? {
        guard length > 0 else { return nil }
        let now = changes.load(ordering: .acquiring)
        let time = sharedWithWriters ? monotonicSeconds() : 0
        if let h = knownHole.withLock({ $0 }), h.changes == now, !sharedWithWriters || time - h.at < TableCache.sharedMaxAge,
           h.start <= offset, offset < h.end, length <= h.end - offset { return (h.start, h.end) }
        // One lseek; only when no data follows `offset` does the file's end bound the hole.
        let found: UInt64?
        do { found = try seek(offset, data: true) } catch { return nil }
        let end: UInt64
        if let found {
            end = found
        } else {
            guard let size = try? self.size(), offset < size else { return nil }
            end = size
        }
        guard end > offset, length <= end - offset else { return nil }
        knownHole.withLock { $0 = (offset, end, now, time) }
        return (offset, end)
    }

    /// Bytes the host file system has allocated for this file.
    public func allocatedBytes() -> UInt64 {
        var st = Glibc.stat()
        guard fstat(fd, &st) == 0 else { return 0 }
        return UInt64(st.st_blocks) * 512
    }

    public func fileStatus() -> Glibc.stat? {
        var st = Glibc.stat()
        return fstat(fd, &st) == 0 ? st : nil
    }
}

public struct FileIdentity: Hashable, Sendable {
    public var device: UInt64
    public var inode: UInt64
}

/// glibc's fallocate(2); Swift's Glibc module hides it behind _GNU_SOURCE.
@_silgen_name("fallocate")
private func linuxFallocate(_ fd: Int32, _ mode: Int32, _ offset: off_t, _ length: off_t) -> Int32
