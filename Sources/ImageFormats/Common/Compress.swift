import CDeflate

/// Raw deflate of one buffer (compressed qcow2 clusters written by `convert -c`), by
/// libdeflate at zlib's default level. One compressor per thread: it is not shareable.
public final class DeflateCompressor {
    private let compressor: OpaquePointer

    public init(level: Int32 = 6) {
        guard let c = libdeflate_alloc_compressor(level) else { fatalError("libdeflate: out of memory") }
        compressor = c
    }

    deinit { libdeflate_free_compressor(compressor) }

    /// The raw deflate (or, `zlib`, zlib-wrapped) stream of `input`, or nil when it would not
    /// fit in `limit` bytes (nil: however long it comes out).
    public func compress(_ input: UnsafeRawBufferPointer, zlib: Bool = false, limit: Int? = nil) -> [UInt8]? {
        let room = limit ?? libdeflate_zlib_compress_bound(compressor, input.count)
        var out = [UInt8](repeating: 0, count: room)
        let n = out.withUnsafeMutableBytes { o in
            zlib ? libdeflate_zlib_compress(compressor, input.baseAddress, input.count, o.baseAddress, room)
                 : libdeflate_deflate_compress(compressor, input.baseAddress, input.count, o.baseAddress, room)
        }
        guard n > 0 else { return nil }
        out.removeLast(room - n)
        return out
    }
}

/// A destination that stores whole units (qcow2 clusters, VMDK grains) compressed, for
/// `convert -c` and streamOptimized output.
public protocol CompressedClusterSink: AnyObject {
    /// Guest bytes per compressed unit.
    var unitBytes: UInt64 { get }
    /// The stored form of one whole unit (the disk's last one zero-padded), or nil to write
    /// it uncompressed through the destination instead.
    func compress(_ unit: UnsafeRawBufferPointer, with compressor: DeflateCompressor) -> [UInt8]?
    /// Stores what `compress` made as the unit at `guestOffset`. One caller at a time.
    func storeCompressed(_ stream: [UInt8], at guestOffset: UInt64) throws
}
