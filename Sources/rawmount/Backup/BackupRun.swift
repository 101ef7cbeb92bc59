import BlockEngine
import ImageFormats
#if canImport(Glibc)
import Glibc
#endif

/// One backup of a qcow2 image into a folder: a full backup, or an incremental one holding
/// exactly the clusters its persistent dirty bitmap marks, backed by the previous backup.
///
/// The order is what makes it safe. The image is locked exclusively for the whole run and
/// read without changing a byte; the new backup is written under a temporary name, made
/// durable and renamed into place, and the manifest updated, before the bitmap is reset.
/// A crash before the rename leaves the old state (the next run makes the same backup
/// again); a crash after it and before the reset leaves a bitmap that still marks what the
/// new backup holds (the next incremental copies those clusters again: a superset, still
/// exact). Resetting the bitmap opens the image for writing for a moment, which flags its
/// bitmaps in use as QEMU does; a crash in that moment leaves the bitmap inconsistent, and
/// the next run, which never trusts such a bitmap, takes a full backup.
struct BackupRun {
    let image: String
    let folder: String
    let bitmap: String
    var forceFull = false
    var recordHash = false
    /// Clusters of the backup files, and the granularity of a bitmap the first run adds.
    static let clusterSize: UInt64 = 65536

    struct Result {
        var kind: String
        var reason: String?
        var file: String?
        var bytesToCopy: UInt64 = 0
        var bytesToZero: UInt64 = 0
        var extents: [(offset: UInt64, length: UInt64, data: Bool)] = []
        var copied = ImageCopy.Totals()
        var sha256: String?
    }

    /// Opens the image read-only under a lock held by `guardFile`: a writer's (the lock a
    /// mount or QEMU takes for writing, so nothing writes while the backup runs and resets
    /// the bitmap), or for a dry run, which changes nothing, a reader's (it refuses writers
    /// too, and runs beside read-only mounts of the image).
    private func openSource(writing: Bool) throws -> (guardFile: ImageFile, source: BlockDevice, qcow2: QCOW2Driver) {
        let guardFile = try ImageFile(path: image, writable: writing)
        try ImageLock.acquire(guardFile, writable: writing)
        let src = try ImageOpener.open(path: image, options: .held(by: guardFile, writable: false))
        guard let qcow2 = src.driver as? QCOW2Driver, qcow2.header.version == 3 else {
            let format = src.driver.info.format
            try? src.close()
            throw BlockError.usage("\(image): incremental backups need persistent dirty bitmaps, which only qcow2 (version 3) images keep; "
                + "this one is \(format == "qcow2" ? "qcow2 version 2 (qemu-img amend -o compat=1.1 upgrades it)" : format). "
                + "Mount it with --overlay work.qcow2 and back up the overlay, or give it a qcow2 data-file as QEMU users do")
        }
        return (guardFile, src, qcow2)
    }

    /// Why this run must be a full backup, or nil for an incremental one.
    private func fullReason(_ chain: BackupChain, _ qcow2: QCOW2Driver, size: UInt64) -> String? {
        if forceFull { return "asked for (--full)" }
        guard let last = chain.last else { return "no backup of this image in \(folder) yet" }
        let all = qcow2.header.hasBitmaps ? (try? QCOW2Bitmaps.list(qcow2.file, header: qcow2.header)) ?? [] : []
        guard let entry = all.first(where: { $0.name == bitmap }) else {
            return "the image has no bitmap '\(bitmap)' (it is added now)"
        }
        guard qcow2.header.autoclear & 1 != 0 else { return "the image's bitmaps are stale (a program without bitmap support wrote it)" }
        guard !entry.inUse, qcow2.dirtyBitmaps.contains(where: { $0.name == bitmap }) else {
            return "bitmap '\(bitmap)' is inconsistent (a writer or a reset did not finish): it cannot be trusted"
        }
        guard entry.auto else { return "bitmap '\(bitmap)' is disabled, so it has not recorded writes" }
        guard last.bitmap == bitmap else { return "the chain in \(folder) follows bitmap '\(last.bitmap)', not '\(bitmap)'" }
        guard last.diskSize == size else { return "the disk is \(size) bytes, the chain's last backup \(last.diskSize)" }
        return nil
    }

    /// The dirty extents, rounded out to whole backup clusters and merged.
    private func dirtyRanges(_ bits: DirtyBitmap, size: UInt64) -> [(offset: UInt64, length: UInt64)] {
        var out: [(offset: UInt64, length: UInt64)] = []
        let cs = Self.clusterSize
        bits.forEachDirtyExtent { start, length in
            let a = start / cs * cs, b = min(size, (start + length + cs - 1) / cs * cs)
            if let last = out.last, last.offset + last.length >= a {
                out[out.count - 1].length = max(last.offset + last.length, b) - last.offset
            } else {
                out.append((a, b - a))
            }
        }
        return out
    }

    func run(dryRun: Bool, progress: (_ read: UInt64, _ total: UInt64) -> Void) throws -> Result {
        let (guardFile, src, qcow2) = try openSource(writing: !dryRun)
        defer { _ = guardFile }
        var sourceOpen = true
        defer { if sourceOpen { try? src.close() } }
        var chain = try BackupChain.load(folder: folder, stem: BackupChain.stem(of: image))
        let reason = fullReason(chain, qcow2, size: src.virtualSize)
        var result = Result(kind: reason == nil ? "incremental" : "full", reason: reason)
        let ranges = reason == nil ? qcow2.dirtyBitmaps.first { $0.name == bitmap }.map { dirtyRanges($0.bits, size: src.virtualSize) } ?? [] : nil

        // What will be copied: data runs, and (incremental) ranges that now read as zeros.
        let plan = try ImageCopy(source: src, destination: src, ranges: ranges, zeroing: reason == nil).plan()
        result.bytesToCopy = plan.runs.reduce(0) { $0 + UInt64($1.length) }
        result.bytesToZero = reason == nil ? plan.zeros.reduce(0) { $0 + $1.length } : 0
        var extents = plan.runs.map { (offset: $0.offset, length: UInt64($0.length), data: true) }
        if reason == nil { extents += plan.zeros.map { (offset: $0.offset, length: $0.length, data: false) } }
        extents.sort { $0.offset < $1.offset }
        for e in extents {  // pieces of one run back together
            if let last = result.extents.last, last.data == e.data, last.offset + last.length == e.offset {
                result.extents[result.extents.count - 1].length += e.length
            } else { result.extents.append(e) }
        }
        if dryRun { return result }

        // The new file, under a temporary name until it is complete and durable.
        let (name, time) = chain.newName(kind: result.kind)
        try removeStalePartials(stem: chain.stem)
        let partial = folder + "/." + name + ".partial"
        var options = QCOW2Create.Options()
        options.clusterSize = Self.clusterSize
        if reason == nil, let last = chain.last { options.backing = last.file; options.backingFormat = "qcow2" }
        try QCOW2Create.create(path: partial, size: src.virtualSize, options: options)
        let dst = try ImageOpener.open(path: partial, options: .init(writable: true, format: .qcow2, lock: true))
        do {
            result.copied = try ImageCopy(source: src, destination: dst, ranges: ranges, zeroing: reason == nil).run { _, read in progress(read, result.bytesToCopy) }
            try dst.flush()
            try dst.close()
        } catch {
            try? dst.close()
            unlink(partial)
            throw error
        }
        if recordHash {
            result.sha256 = try DiskHasher(device: src, start: 0, length: src.virtualSize).run([.sha256]) { _ in }[.sha256]
        }
        try ImageFile(path: partial, writable: false).sync()
        try Durable.rename(partial, to: folder + "/" + name, folder: folder)
        if reason != nil { chain.points = [] }
        chain.points.append(.init(file: name, kind: result.kind, time: time, bitmap: bitmap, bytesCopied: result.copied.written,
                                  bytesZeroed: result.copied.zeroed, extents: result.extents.count, diskSize: src.virtualSize,
                                  sha256: result.sha256))
        try chain.save()
        result.file = folder + "/" + name
        try src.close()
        sourceOpen = false

        // Only now the bitmap starts over (added by the first run).
        let w = try ImageOpener.open(path: image, options: .held(by: guardFile, writable: true))
        do {
            guard let set = (w.driver as? QCOW2Driver)?.bitmaps else {
                throw BlockError.invalid(file: image, field: "file", detail: "it is no longer a qcow2 image with bitmaps")
            }
            if let entry = set.entries.first(where: { $0.bitmap.name == bitmap }) {
                if entry.consistent && entry.bitmap.auto { try set.clear(bitmap) } else {
                    try set.remove(bitmap)
                    try set.add(bitmap, granularity: entry.bitmap.granularity, enabled: true)
                }
            } else {
                try set.add(bitmap, granularity: Self.clusterSize, enabled: true)
            }
            try w.close()
        } catch {
            try? w.close()
            throw error
        }
        return result
    }

    /// Temporary files an interrupted run left (never part of the chain).
    private func removeStalePartials(stem: String) throws {
        for name in (try? PathName.entries(of: folder)) ?? [] where name.hasPrefix("." + stem + ".") && name.hasSuffix(".partial") {
            unlink(folder + "/" + name)
        }
    }
}
