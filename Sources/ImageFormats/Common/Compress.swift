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

    /// The deflate stream of `input`, or nil when it would not fit in `limit` bytes.
    public func compress(_ input: UnsafeRawBufferPointer, limit: Int) -> [UInt8]? {
        var out = [UInt8](repeating: 0, count: limit)
        let n = out.withUnsafeMutableBytes { libdeflate_deflate_compress(compressor, input.baseAddress, input.count, $0.baseAddress, limit) }
        guard n > 0 else { return nil }
        out.removeLast(limit - n)
        return out
    }
}
