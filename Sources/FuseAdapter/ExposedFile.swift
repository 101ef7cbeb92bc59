import BlockEngine
import CFuse3
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// One file the mount shows: a name and the block device behind it.
public struct ExposedFile: Sendable {
    public let name: String
    public let device: BlockDevice
    public let readOnly: Bool
    /// Large writes applied in the background (nil when read-only); see WriteBehind.
    public let writeBehind: WriteBehind?
    /// Preferred I/O size (st_blksize): the image's cluster size.
    public var blockSize: Int { Int(min(max(device.clusterSize, 512), 1 << 20)) }

    /// A view over another file's disk (a dirty bitmap's): read-only, served with direct
    /// I/O so it always shows the disk as it is now, and sized by `dirtyBytes`.
    public let viewOf: WriteBehind?
    let viewBytes: (@Sendable () -> UInt64)?
    public var isView: Bool { viewBytes != nil }
    /// Writes still queued for this file's disk, applied before it is read or sought.
    var pendingWrites: WriteBehind? { writeBehind ?? viewOf }

    /// Where this file's bytes lie on `device` and how many there are: the whole disk, or
    /// one partition of it.
    public let start: UInt64
    public let size: UInt64
    /// A partition of the disk shown as the mount's first file: served with direct I/O when
    /// it can change (`directIO`), and each change through it drops the same bytes from the
    /// disk file's page cache.
    public let isPartition: Bool
    /// Served without the kernel's page cache, so it always shows the disk as it is now. A
    /// partition that cannot change (read-only, and no other writer shares the image) is
    /// cached like the disk file: the two caches can then never disagree.
    var directIO: Bool { isView || (isPartition && (!readOnly || device.driver.file.sharedWithWriters)) }

    public init(name: String, device: BlockDevice, readOnly: Bool) {
        self.name = name
        self.device = device
        self.readOnly = readOnly || !device.isWritable
        writeBehind = self.readOnly ? nil : WriteBehind(device: device)
        viewOf = nil
        viewBytes = nil
        start = 0
        size = device.virtualSize
        isPartition = false
        allocation = AllocationCount(device: device)
    }

    /// `length` bytes of `disk`'s device from `start`: reads, writes (when `disk` is
    /// writable), SEEK_DATA/SEEK_HOLE and st_blocks confined to them; writes share the
    /// disk's write-behind queue, so the two files see one order of changes.
    public init(name: String, partitionOf disk: ExposedFile, start: UInt64, length: UInt64) {
        self.name = name
        device = disk.device
        readOnly = disk.readOnly
        writeBehind = disk.writeBehind
        viewOf = nil
        viewBytes = nil
        self.start = disk.start + start
        size = length
        isPartition = true
        lastChange = disk.lastChange
        allocation = AllocationCount(device: disk.device, range: self.start ..< self.start + length)
    }

    /// A read-only view (`device`, whose backing is `source`'s disk) whose st_blocks is
    /// `dataBytes`.
    public init(name: String, view device: BlockDevice, of source: ExposedFile, dataBytes: @escaping @Sendable () -> UInt64) {
        self.name = name
        self.device = device
        readOnly = true
        writeBehind = nil
        viewOf = source.writeBehind
        viewBytes = dataBytes
        lastChange = source.lastChange
        start = 0
        size = device.virtualSize
        isPartition = false
        allocation = nil
    }

    /// When the disk was last changed through this mount (nil: not yet); shown as the
    /// file's mtime and ctime, so tools that compare times (make, rsync -u, backups) see it.
    private var lastChange = ChangeClock()
    func noteChange() { lastChange.note() }
    /// Changes finished (or handed to the write-behind); `PeriodicWriteBack` writes back after it moves.
    private let finished = Counter()
    func noteChangeDone() { finished.add() }
    var completedChanges: Int { finished.value }
    var changedAt: timespec? { lastChange.time }

    /// Guest allocation for st_blocks (see `AllocationCount`).
    private let allocation: AllocationCount?
    var allocatedBytes: UInt64 { viewBytes?() ?? allocation?.value() ?? 0 }
}

/// The session pointer, set once the session exists and cleared before it is destroyed.
final class SessionReference: @unchecked Sendable {
    private let value = Mutex<UInt>(0)
    var pointer: OpaquePointer? { OpaquePointer(bitPattern: value.withLock { $0 }) }
    func set(_ p: OpaquePointer?) { value.withLock { $0 = UInt(bitPattern: p.map { Int(bitPattern: UnsafeRawPointer($0)) } ?? 0) } }
}

final class Counter: Sendable {
    private let count = Atomic<Int>(0)
    func add() { count.add(1, ordering: .relaxed) }
    var value: Int { count.load(ordering: .relaxed) }
}

/// The time of the last change, in nanoseconds (0: none); noted on every write, so no lock.
final class ChangeClock: Sendable {
    private let nanoseconds = Atomic<Int64>(0)
    func note() {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        nanoseconds.store(Int64(now.tv_sec) * 1_000_000_000 + Int64(now.tv_nsec), ordering: .relaxed)
    }
    var time: timespec? {
        let ns = nanoseconds.load(ordering: .relaxed)
        return ns == 0 ? nil : timespec(tv_sec: Int(ns / 1_000_000_000), tv_nsec: Int(ns % 1_000_000_000))
    }
}



/// The tree a mount shows: either the mountpoint itself is the raw file (a file mountpoint),
/// or the mountpoint is a directory listing the files. Inode 1 is the root.
public final class FuseFilesystem: Sendable {
    public let files: [ExposedFile]
    public let rootIsFile: Bool
    /// Where failed requests are recorded (mount --log); nil: nowhere.
    public let log: ServerLog?
    /// Owner and permission bits of the raw file: the top image file's, so a 0600 image is
    /// not readable by others under allow_other (write bits dropped when read-only).
    let uid: uid_t, gid: gid_t, mode: mode_t
    let directoryMode: mode_t
    /// `-o max_read=N`: the connection must say the same at INIT, or libfuse aborts the
    /// session after the mount was made (set once by `FuseMount`, before the session runs).
    let maxRead = Mutex<UInt32?>(nil)

    /// `-o uid=,gid=,umask=`: the owner and permissions shown instead of the image file's,
    /// as other FUSE file systems take them (umask applies to 0666 files, 0777 directories).
    public struct Ownership: Sendable {
        public var uid: uid_t?, gid: gid_t?, umask: mode_t?
        public init(uid: uid_t? = nil, gid: gid_t? = nil, umask: mode_t? = nil) { self.uid = uid; self.gid = gid; self.umask = umask }
    }
    /// Times shown for every inode: those of the top image file at mount time.
    let times: (atime: timespec, mtime: timespec, ctime: timespec)

    public init(files: [ExposedFile], rootIsFile: Bool, log: ServerLog? = nil, ownership: Ownership = .init()) {
        precondition(!files.isEmpty && (!rootIsFile || files.count == 1))
        self.files = files
        self.log = log
        self.rootIsFile = rootIsFile
        var owner: (uid_t, gid_t), bits: mode_t
        if let st = files[0].device.driver.file.fileStatus() {
            times = (st.st_atim, st.st_mtim, st.st_ctim)
            owner = (st.st_uid, st.st_gid); bits = st.st_mode & 0o777
        } else {
            var now = timespec(); clock_gettime(CLOCK_REALTIME, &now)
            times = (now, now, now)
            owner = (getuid(), getgid()); bits = 0o600
        }
        if let u = ownership.uid { owner.0 = u }
        if let g = ownership.gid { owner.1 = g }
        if let m = ownership.umask { bits = 0o666 & ~m }
        // (An owner or mode given with -o is the administrator's explicit choice.)
        let explicit = ownership.uid != nil || ownership.gid != nil || ownership.umask != nil
        let contributors = explicit ? [] : files[0].device.contributingFiles.compactMap { $0.fileStatus() }
        (uid, gid, mode) = (owner.0, owner.1, Self.readableMode(bits, uid: owner.0, gid: owner.1, contributors: contributors))
        directoryMode = ownership.umask.map { 0o777 & ~$0 } ?? 0o755
    }

    static let rootInode: UInt64 = 1

    /// The writable files for the periodic write-back: a file's changes count once its
    /// write-behind took them, and its held writes are applied before each write-back.
    public var writeBackTargets: [PeriodicWriteBack.Target] {
        files.filter { !$0.readOnly }.map { f in
            PeriodicWriteBack.Target(name: f.name, device: f.device, changes: { UInt64(truncatingIfNeeded: f.completedChanges) },
                                     drain: { f.writeBehind?.drain() })
        }
    }

    /// `mode` with read permission kept only for the classes that may read every file the
    /// disk's bytes come from (a backing file, an extent, a Bochs base may be more private
    /// than the top image): with `-o allow_other` the raw file is never a way around them.
    /// Root as the owner reads anything; group membership is judged by the shown group.
    public static func readableMode(_ mode: mode_t, uid: uid_t, gid: gid_t, contributors: [stat]) -> mode_t {
        func other(_ k: stat) -> Bool { k.st_mode & 0o004 != 0 }
        func group(_ k: stat) -> Bool { (k.st_gid == gid && k.st_mode & 0o040 != 0) || other(k) }
        func owner(_ k: stat) -> Bool { uid == 0 || (k.st_uid == uid ? k.st_mode & 0o400 != 0 : group(k)) }
        var m = mode
        if !contributors.allSatisfy(owner) { m &= ~0o400 }
        if !contributors.allSatisfy(group) { m &= ~0o040 }
        if !contributors.allSatisfy(other) { m &= ~0o004 }
        return m
    }

    /// The libfuse session, once mounted: partition files drop the disk file's cached pages
    /// through it.
    let session = SessionReference()

    /// After a change through a partition file: the disk file (inode 2) must not go on
    /// showing the old bytes from its page cache. Done before the change is answered, so
    /// a reader of the disk file that runs after the writer sees the new data.
    func dropDiskCache(at offset: UInt64, length: UInt64) {
        guard !rootIsFile, length > 0, let se = session.pointer else { return }
        _ = fuse_lowlevel_notify_inval_inode(se, 2, off_t(offset), off_t(length))
    }

    /// The file behind an inode, or nil for the root directory / unknown inodes.
    @inline(__always)
    func file(_ ino: UInt64) -> ExposedFile? {
        if rootIsFile { return ino == Self.rootInode ? files[0] : nil }
        let i = Int(truncatingIfNeeded: ino) - 2
        return i >= 0 && i < files.count ? files[i] : nil
    }

    func inode(named name: String) -> UInt64? {
        guard !rootIsFile, let i = files.firstIndex(where: { $0.name == name }) else { return nil }
        return UInt64(i + 2)
    }

    func attributes(_ ino: UInt64) -> stat? {
        var st = stat()
        st.st_ino = __ino_t(ino)
        st.st_uid = uid; st.st_gid = gid
        st.st_atim = times.atime; st.st_mtim = times.mtime; st.st_ctim = times.ctime
        if let f = file(ino) {
            if let t = f.changedAt { st.st_mtim = t; st.st_ctim = t }
            st.st_mode = S_IFREG | (f.readOnly ? mode & ~0o222 : mode)
            st.st_nlink = 1
            st.st_size = off_t(f.size)
            st.st_blksize = Int(f.blockSize)
            let used = f.allocatedBytes
            st.st_blocks = blkcnt_t((used + 511) / 512)
            return st
        }
        guard ino == Self.rootInode && !rootIsFile else { return nil }
        st.st_mode = S_IFDIR | directoryMode
        st.st_nlink = 2
        st.st_size = 4096
        st.st_blksize = 4096
        return st
    }
}
