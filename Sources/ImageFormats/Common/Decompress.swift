import BlockEngine
import CZlib
import CZstd

/// Compressed clusters (qcow2 clusters, VMDK streamOptimized grains): reading their stored
/// bytes and inflating the first bytes of them, for every format the same way.
enum Decompress {
    enum Stream { case rawDeflate, zlib, zstd }

    /// Up to `count` stored bytes from `offset`, fewer where the file ends (a last compressed
    /// cluster may claim sectors past it). The buffer is not zero-filled first.
    static func stored(_ file: ImageFile, count: Int, at offset: UInt64) throws -> [UInt8] {
        var got = 0
        let bytes = try [UInt8](unsafeUninitializedCapacity: count) { buffer, n in
            got = try file.readUpTo(into: UnsafeMutableRawBufferPointer(buffer), at: offset)
            n = got
        }
        return bytes
    }

    /// The first `limit` bytes `input` decompresses to. A zlib stream inflated whole also has
    /// its checksum checked. Throws `invalid` naming `what` when the stream is damaged or
    /// gives fewer bytes.
    static func first(_ limit: Int, of input: [UInt8], as stream: Stream, whole: Int, file: String, what: String) throws -> [UInt8] {
        var produced = 0
        var ok = false
        let out = [UInt8](unsafeUninitializedCapacity: limit) { buffer, n in
            input.withUnsafeBytes { c in
                switch stream {
                case .zstd:
                    ok = rm_zstd_decompress_cluster(c.baseAddress, c.count, buffer.baseAddress, limit, &produced) == 0
                case .zlib where limit == whole:
                    var length = uLongf(limit)
                    ok = uncompress(buffer.baseAddress, &length, c.baseAddress?.assumingMemoryBound(to: Bytef.self), uLong(c.count)) == Z_OK
                    produced = Int(length)
                case .zlib, .rawDeflate:
                    ok = rm_inflate(c.baseAddress, c.count, buffer.baseAddress, limit, &produced, stream == .zlib ? 15 : -15) == Z_OK
                }
            }
            n = ok ? produced : 0
        }
        guard ok, produced == limit else {
            throw BlockError.invalid(file: file, field: what, detail: ok ? "inflates to \(produced) bytes, not the \(whole)-byte cluster"
                                                                          : "the compressed stream is damaged")
        }
        return out
    }
}
