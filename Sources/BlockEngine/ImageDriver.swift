/// What a guest range `[offset, offset+length)` is, as one format driver sees it.
public enum Mapping: Equatable, Sendable {
    /// Bytes live in this image file, contiguous from `host`, and may be overwritten in place.
    case data(host: UInt64, length: UInt64)
    /// Bytes live in this image file like `.data`, but may not be overwritten in place (a
    /// qcow2 cluster shared with an internal snapshot): a write goes through allocate/commit,
    /// so the engine copies the cluster and the driver links the copy.
    case shared(host: UInt64, length: UInt64)
    /// Reads as zeros and stops backing-file lookup (zero flag, discarded block, ZERO extent).
    case zero(length: UInt64)
    /// Not in this image: the backing image answers, or zeros without one.
    case unallocated(length: UInt64)
    /// A compressed cluster; the driver inflates it through `readCompressed`.
    case compressed(host: UInt64, size: UInt64, length: UInt64)

    /// This mapping extended by `next` when they form one run (same kind, and for data,
    /// contiguous on the host); nil when they do not. Drivers use it to return long runs.
    public func merged(with next: Mapping) -> Mapping? {
        switch (self, next) {
        case let (.data(h, l), .data(h2, l2)) where h + l == h2: return .data(host: h, length: l + l2)
        case let (.shared(h, l), .shared(h2, l2)) where h + l == h2: return .shared(host: h, length: l + l2)
        case let (.zero(l), .zero(l2)): return .zero(length: l + l2)
        case let (.unallocated(l), .unallocated(l2)): return .unallocated(length: l + l2)
        default: return nil
        }
    }

    public var length: UInt64 {
        switch self {
        case let .data(_, n), let .shared(_, n), let .zero(n), let .unallocated(n), let .compressed(_, _, n): return n
        }
    }
}

/// Host space the engine writes a new cluster run into before the driver links it.
public struct Allocation: Sendable, Equatable {
    /// First guest byte of the run (cluster aligned).
    public var guestOffset: UInt64
    /// First host byte of the run.
    public var hostOffset: UInt64
    /// Bytes in the run (whole clusters).
    public var length: UInt64
    /// The host range was never written (appended past everything in the file), so it already
    /// reads as zeros: a zero fill around the guest's bytes need not be written.
    public var fresh: Bool
    /// The run's guest bytes may be of several kinds (a qcow2 cluster copied whole whose
    /// subclusters are data, zero and unallocated): the engine then fills around the request
    /// only through the read path, never from the kind at the requested offset.
    public var mixed: Bool
    public init(guestOffset: UInt64, hostOffset: UInt64, length: UInt64, fresh: Bool = false, mixed: Bool = false) {
        self.guestOffset = guestOffset; self.hostOffset = hostOffset; self.length = length; self.fresh = fresh
        self.mixed = mixed
    }
}

/// A byte range of an image file (`resolve`d like a `.data` host address).
public struct HostRange: Sendable, Equatable {
    public var offset: UInt64
    public var length: UInt64
    public init(offset: UInt64, length: UInt64) { self.offset = offset; self.length = length }
}

/// Facts `rawmount info` prints.
public struct ImageInfo: Sendable {
    public var format: String
    public var virtualSize: UInt64
    public var clusterSize: UInt64
    public var details: [(String, String)]
    /// Whether the format has clusters at all (qemu-img info names a cluster size only then:
    /// not for raw or a fixed VHD).
    public var hasClusters: Bool
    public init(format: String, virtualSize: UInt64, clusterSize: UInt64, details: [(String, String)] = [], hasClusters: Bool = true) {
        self.format = format; self.virtualSize = virtualSize; self.clusterSize = clusterSize; self.details = details
        self.hasClusters = hasClusters
    }
}

/// The mapping role, which every format has: translate guest ranges to host ranges and
/// say what the image holds; the `BlockDevice` engine does all data I/O.
public protocol ImageMapping: AnyObject, Sendable {
    var file: ImageFile { get }
    var info: ImageInfo { get }

    /// Mapping of `[offset, offset+n)` for some `0 < n <= maxLength` (the engine never asks
    /// past the virtual size).
    func map(_ offset: UInt64, maxLength: UInt64) throws -> Mapping
    /// Like `map`, for SEEK_DATA/SEEK_HOLE and st_blocks; drivers may answer more precisely
    /// (raw asks the host file system about holes).
    func status(_ offset: UInt64, maxLength: UInt64) throws -> Mapping

    /// The file and offset a `.data` host address refers to. Single-file formats use the
    /// default (their own file); multi-file formats (VMDK extents) encode the file in the
    /// high bits of the host address so contiguous runs never cross files.
    func resolve(host: UInt64) -> (file: ImageFile, offset: UInt64)

    /// Inflates one compressed cluster and copies guest bytes `[offset, offset+buffer.count)` out.
    func readCompressed(_ mapping: Mapping, guestOffset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws
    /// The compressed clusters of one request (2 or more). The default inflates them several
    /// at once (a sequential read of a compressed image is otherwise bound by one core); a
    /// driver whose pieces are cheaper read together (EWF's stored chunks lying back to
    /// back: one preadv) reads them its own way.
    func readCompressed(_ pieces: [CompressedPiece]) throws
    /// Where guest bytes `[offset, offset + count)` already lie in memory a reply can be
    /// written from (`LentFile`: mapped image bytes this mount has checked, zeros), when every
    /// one of them does: the regions in order. nil (the default): read them.
    func lend(_ offset: UInt64, count: Int) -> [UnsafeRawBufferPointer]?

    /// Guest bytes holding data as the header counts them, when it does (VDI's
    /// blocks_allocated): st_blocks shows it until the first walk of the tables is done.
    var allocatedBytesHint: UInt64? { get }
    /// Bytes the host file system holds for the image's files (all extents of a split VMDK).
    var hostAllocatedBytes: UInt64 { get }
    /// The image's consistent dirty bitmaps, by name, for views (empty for most formats).
    var dirtyBitmaps: [(name: String, bits: DirtyBitmap)] { get }
    /// Every file whose bytes this image shows (the image file; a split VMDK's extents).
    var contributingFiles: [ImageFile] { get }
    /// Why this image is served read-only even when writing was asked for (nil: it is not,
    /// or only because its file was opened read-only); `mount` tells the user.
    var readOnlyReason: String? { get }
    /// Digests of the whole disk the image stores (EWF's MD5 and SHA-1 of the acquired
    /// media), by algorithm name (md5, sha1), in lowercase hex; empty for most formats.
    var storedDigests: [(algorithm: String, hex: String)] { get }
}

/// The lifecycle role: metadata write-back and closing (read-only formats only close).
public protocol ImageLifecycle: AnyObject, Sendable {
    /// Writes back dirty metadata, then makes everything durable.
    func flush() throws
    /// Writes back metadata that has settled, in the format's order, without making it
    /// durable (the periodic write-back that bounds what a killed server loses).
    func writeBack() throws
    /// Flushes and marks the image cleanly closed.
    func close() throws
}

/// A format rawmount reads: mapping and lifecycle. A format that also writes conforms to
/// `ImageAllocating`; one that does not is read-only by construction.
public protocol ImageDriver: ImageMapping, ImageLifecycle {}

/// The allocating role, only for formats rawmount writes: reserve host space, link filled
/// runs, zero and free, guard metadata.
public protocol ImageAllocating: ImageDriver {
    /// Whether this open image takes writes (its file opened for writing, nothing in it
    /// that keeps it read-only: `readOnlyReason`).
    var isWritable: Bool { get }

    /// Reserves host space for the clusters covering `[offset, offset+length)`; the result
    /// starts at or before `offset` and may cover less than `length` (the engine loops).
    /// Tables are not touched yet.
    func allocate(_ offset: UInt64, length: UInt64) throws -> Allocation
    /// Links a run the engine has filled with data into the tables.
    func commit(_ allocation: Allocation) throws
    /// The engine could not write the run's data (host disk full, I/O error): nothing will
    /// link it, so the driver may take the space back instead of leaking it.
    func abandon(_ allocation: Allocation)

    /// Host ranges the last `commit` or `zeroRange` stopped pointing at (a copied shared
    /// cluster, a compressed range, a discarded cluster). The engine collects them right
    /// after that call and hands them back through `release` only once a flush has made the
    /// change durable, so space is reused only when a crash can no longer leave two owners.
    func takeUnlinked() -> [HostRange]
    /// Frees ranges `takeUnlinked` reported (refcounts drop; the space may be reused).
    func release(_ ranges: [HostRange]) throws

    /// Makes whole, aligned units of `[offset, offset+length)` read as zeros without data
    /// writes (zero flag, unallocation, hole punching). Returns the sub-range it handled; the
    /// engine writes zeros over the rest.
    func zeroRange(_ offset: UInt64, length: UInt64, deallocate: Bool) throws -> (offset: UInt64, length: UInt64)

    /// Makes whole clusters of `[offset, offset+length)` read from the backing file again
    /// (the cluster the disk ends in counts as whole); returns the sub-range it handled
    /// (length 0: the format cannot).
    func unallocate(_ offset: UInt64, length: UInt64) throws -> (offset: UInt64, length: UInt64)

    /// Whether the engine may write an allocation's data outside its allocation lock while
    /// other allocations go on (the driver's commit and abandon then must not assume they
    /// come in allocation order).
    var fillsConcurrently: Bool { get }

    /// Called once before every guest write or zeroing (VMDK bumps its CID on the first).
    func willWrite() throws
    /// Guest bytes `[offset, offset+length)` are being written, zeroed or discarded (qcow2
    /// records them in its dirty bitmaps).
    func noteGuestChange(_ offset: UInt64, length: UInt64)
    /// Refuses a guest write the image must not take (a probed raw image: another format's
    /// header in its first sector). Called before anything is written.
    func checkWrite(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws

    /// The metadata a host write of `[host, host+length)` (a `.data` host address) would
    /// overwrite, if any: the engine asks before writing a new allocation (nil: none known).
    func metadataOverlap(host: UInt64, length: UInt64) -> MetadataRanges.Range?
    /// A write was about to land on metadata (`.metadataOverlap`): mark the image corrupt
    /// where the format has a mark for it (qcow2's corrupt bit, as QEMU does).
    func signalCorruption(_ error: BlockError)
}

extension ImageMapping {
    public var readOnlyReason: String? { nil }
    public var storedDigests: [(algorithm: String, hex: String)] { [] }
    public var allocatedBytesHint: UInt64? { nil }
    public var hostAllocatedBytes: UInt64 { file.allocatedBytes() }
    public var dirtyBitmaps: [(name: String, bits: DirtyBitmap)] { [] }
    public var contributingFiles: [ImageFile] { [file] }
    @inline(__always)
    public func resolve(host: UInt64) -> (file: ImageFile, offset: UInt64) { (file, host) }
    public func status(_ offset: UInt64, maxLength: UInt64) throws -> Mapping { try map(offset, maxLength: maxLength) }
    public func readCompressed(_ mapping: Mapping, guestOffset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws {
        throw BlockError.unsupported(file: file.path, feature: "compressed clusters")
    }
    public func readCompressed(_ pieces: [CompressedPiece]) throws { try CompressedPiece.readInParallel(pieces, from: self) }
    public func lend(_ offset: UInt64, count: Int) -> [UnsafeRawBufferPointer]? { nil }
}

extension ImageLifecycle {
    /// Read-only formats have nothing to write back.
    public func flush() throws {}
    public func writeBack() throws { try flush() }
}

extension ImageAllocating {
    public var fillsConcurrently: Bool { false }
    public func willWrite() throws {}
    public func noteGuestChange(_ offset: UInt64, length: UInt64) {}
    public func metadataOverlap(host: UInt64, length: UInt64) -> MetadataRanges.Range? { nil }
    public func signalCorruption(_ error: BlockError) {}
    public func checkWrite(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {}
    public func abandon(_ allocation: Allocation) {}
    public func takeUnlinked() -> [HostRange] { [] }
    public func release(_ ranges: [HostRange]) throws {}
    public func zeroRange(_ offset: UInt64, length: UInt64, deallocate: Bool) throws -> (offset: UInt64, length: UInt64) {
        (offset, 0)
    }
    public func unallocate(_ offset: UInt64, length: UInt64) throws -> (offset: UInt64, length: UInt64) { (offset, 0) }
}

extension ImageDriver {
    /// This driver's allocating role, when its format writes and this open image takes writes.
    public var writer: (any ImageAllocating)? {
        guard let w = self as? any ImageAllocating, w.isWritable else { return nil }
        return w
    }
}
