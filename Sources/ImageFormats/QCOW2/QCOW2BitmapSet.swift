import BlockEngine
import Synchronization

/// The persistent dirty bitmaps of a writable qcow2 open, as QEMU keeps them: consistent
/// bitmaps are loaded and, when enabled (`auto`), record every guest change; bitmaps that
/// were in use at open are inconsistent and only carried along (or removed). The changes the
/// `bitmap` verbs make land at close, when `QCOW2Driver.storeBitmaps` writes the set.
public final class QCOW2BitmapSet: Sendable {
    public struct Entry: Sendable {
        /// As on disk at open (flags before the in-use marking), or as made by `add`.
        public var bitmap: QCOW2Bitmap
        /// nil: inconsistent (in use at open), never loaded or stored.
        public var bits: DirtyBitmap?
        /// Table and data clusters of the copy on disk, freed once a new copy is stored.
        var clusters: [HostRange]
        public var consistent: Bool { bits != nil }
    }

    struct State {
        var entries: [Entry]
        /// Clusters of removed bitmaps, freed at the next store.
        var dropped: [HostRange] = []
        /// The image held bitmaps when opened (so a store must run even if none is left).
        var hadBitmaps: Bool
        /// Where the directory on disk lies (freed once a new one is stored).
        var directory: (offset: UInt64, size: UInt64)?
        /// The disk size the bitmaps cover: the image's, until `resize`.
        var diskSize: UInt64
    }

    let state: Mutex<State>
    let path: String
    let header: QCOW2Header
    /// Bitmaps that record (enabled and consistent): a guest write takes the lock only when
    /// there is one, so images without bitmaps pay nothing per write.
    private let recording = Atomic<Int>(0)

    init(entries: [Entry], header: QCOW2Header, path: String) {
        state = Mutex(State(entries: entries, hadBitmaps: !entries.isEmpty,
                            directory: header.hasBitmaps ? (header.bitmapDirectoryOffset, header.bitmapDirectorySize) : nil,
                            diskSize: header.size))
        self.header = header
        self.path = path
        recording.store(Self.recorders(entries), ordering: .releasing)
    }

    private static func recorders(_ entries: [Entry]) -> Int { entries.filter { $0.bitmap.auto && $0.consistent }.count }

    /// Runs a change to the entries and recounts the recording ones.
    private func changing<R>(_ body: (inout State) throws -> R) rethrows -> R {
        try state.withLock { s in
            defer { recording.store(Self.recorders(s.entries), ordering: .releasing) }
            return try body(&s)
        }
    }

    public var entries: [Entry] { state.withLock { $0.entries } }

    /// Records a guest change into every enabled, consistent bitmap.
    func record(_ offset: UInt64, length: UInt64) {
        guard recording.load(ordering: .acquiring) > 0 else { return }
        state.withLock { s in
            for e in s.entries where e.bitmap.auto { e.bits?.mark(offset, length: length) }
        }
    }

    var needsStore: Bool { state.withLock { $0.hadBitmaps || !$0.entries.isEmpty } }

    // MARK: the `bitmap` verbs (QEMU's rules: an inconsistent bitmap can only be removed)

    private func bad(_ detail: String) -> BlockError { .usage("\(path): \(detail)") }

    private func index(_ s: State, _ name: String, usable: Bool) throws -> Int {
        guard let i = s.entries.firstIndex(where: { $0.bitmap.name == name }) else { throw bad("no bitmap named '\(name)'") }
        if usable && !s.entries[i].consistent {
            throw bad("bitmap '\(name)' is inconsistent (in use when the image was opened: its writer did not close it) and cannot be used; only `rawmount bitmap remove` works on it")
        }
        return i
    }

    public func add(_ name: String, granularity: UInt64, enabled: Bool) throws {
        if let why = QCOW2Bitmaps.creationProblem(name: name, granularity: granularity, header: header) { throw bad("cannot add bitmap '\(name)': \(why)") }
        try changing { s in
            guard !s.entries.contains(where: { $0.bitmap.name == name }) else { throw bad("a bitmap named '\(name)' already exists") }
            guard s.entries.count < Int(QCOW2Bitmaps.maxBitmaps) else { throw bad("the image already holds \(QCOW2Bitmaps.maxBitmaps) bitmaps") }
            // The directory must stay within what QEMU (and `readDirectory`) reads back.
            let size = s.entries.reduce(0) { $0 + QCOW2Bitmaps.entryBytes(nameBytes: $1.bitmap.nameBytes.count) }
                + QCOW2Bitmaps.entryBytes(nameBytes: name.utf8.count)
            guard UInt64(size) <= QCOW2Bitmaps.maxDirectoryBytes else {
                throw bad("the bitmap directory would grow past QEMU's \(QCOW2Bitmaps.maxDirectoryBytes) bytes")
            }
            let b = QCOW2Bitmap(name: name, nameBytes: Array(name.utf8), granularity: granularity, flags: enabled ? QCOW2Bitmaps.flagAuto : 0,
                                tableOffset: 0, tableEntries: 0, entryOffset: 0)
            s.entries.append(Entry(bitmap: b, bits: DirtyBitmap(granularity: granularity, diskSize: s.diskSize), clusters: []))
        }
    }

    /// The disk is becoming `size` bytes: every bitmap covers that from now on, its bits kept
    /// up to the new end (new space starts clean), as QEMU resizes them. An inconsistent
    /// bitmap cannot be resized (nor, then, the image).
    public func resize(to size: UInt64) throws {
        try changing { s in
            if let e = s.entries.first(where: { !$0.consistent }) {
                throw bad("bitmap '\(e.bitmap.name)' is inconsistent and cannot be resized; remove it first (rawmount bitmap remove)")
            }
            for i in s.entries.indices {
                guard let old = s.entries[i].bits else { continue }
                let new = DirtyBitmap(granularity: old.granularity, diskSize: size)
                old.forEachDirtyExtent { o, l in if o < size { new.mark(o, length: min(l, size - o)) } }
                s.entries[i].bits = new
            }
            s.diskSize = size
        }
    }

    public func remove(_ name: String) throws {
        try changing { s in
            let i = try index(s, name, usable: false)
            s.dropped += s.entries[i].clusters
            s.entries.remove(at: i)
        }
    }

    /// Sets the clusters an inconsistent bitmap held (read when it is removed).
    func noteClusters(_ name: String, _ clusters: [HostRange]) {
        state.withLock { s in
            if let i = s.entries.firstIndex(where: { $0.bitmap.name == name }) { s.entries[i].clusters = clusters }
        }
    }

    public func clear(_ name: String) throws {
        try state.withLock { s in try s.entries[index(s, name, usable: true)].bits?.clearAll() }
    }

    public func setEnabled(_ name: String, _ enabled: Bool) throws {
        try changing { s in
            let i = try index(s, name, usable: true)
            let f = s.entries[i].bitmap.flags
            s.entries[i].bitmap.flags = enabled ? f | QCOW2Bitmaps.flagAuto : f & ~QCOW2Bitmaps.flagAuto
        }
    }

    /// DST |= SRC (rounded out to DST's granules when the granularities differ).
    public func merge(_ source: String, into target: String) throws {
        let (src, dst) = try state.withLock { s in
            (s.entries[try index(s, source, usable: true)].bits!, s.entries[try index(s, target, usable: true)].bits!)
        }
        if src !== dst { dst.merge(src) }
    }
}
