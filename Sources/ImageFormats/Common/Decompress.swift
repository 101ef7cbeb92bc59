import BlockEngine
import Synchronization
import CDeflate
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

    /// At least the first `limit` bytes `input` decompresses to: the whole cluster when
    /// libdeflate (or zstd's one-shot decompress) can produce it in one pass, which costs
    /// less than zlib inflating most of it; else exactly `limit` from the streaming decoder.
    /// A deflate stream of coded blocks wanted for at most `partialShare` of its cluster goes
    /// to zlib directly: zlib stopping there costs less than libdeflate decoding all of it.
    /// A zlib stream inflated whole also has its checksum checked. Throws `invalid` naming
    /// `what` when the stream is damaged or gives fewer bytes.
    static func first(_ limit: Int, of input: [UInt8], as stream: Stream, whole: Int, file: String, what: String) throws -> [UInt8] {
        if stream != .zstd && limit <= Int(Double(whole) * partialShare) && !startsStored(input, as: stream) {
            return try streamed(limit, of: input, as: stream, whole: whole, file: file, what: what)
        }
        if let all = exact(whole, of: input, as: stream) { return all }
        return try streamed(limit, of: input, as: stream, whole: whole, file: file, what: what)
    }

    /// Measured here on 64 KiB clusters of Huffman-coded literals: zlib decodes at about
    /// 0.8x libdeflate's speed, so stopping at half the cluster costs about 0.6 of a whole
    /// libdeflate pass. (zstd decompresses one-shot far faster than it streams.)
    static let partialShare = 0.5

    /// Whether the deflate data opens with a stored block (BTYPE 00, what zlib writes for
    /// incompressible data): libdeflate copies those at memory speed, 5-50x faster than zlib
    /// gets through even part of them, so such a cluster is inflated whole.
    static func startsStored(_ input: [UInt8], as stream: Stream) -> Bool {
        let at = stream == .zlib ? 2 : 0  // past the zlib header
        return input.count > at && (input[at] >> 1) & 3 == 0
    }

    /// The cluster, if the stream ends exactly at `whole` bytes; nil for anything else
    /// (longer, shorter, damaged), which the streaming decoders then decide.
    private static func exact(_ whole: Int, of input: [UInt8], as stream: Stream) -> [UInt8]? {
        var ok = false
        let out = [UInt8](unsafeUninitializedCapacity: whole) { buffer, n in
            ok = input.withUnsafeBytes { c in
                switch stream {
                case .zstd: ZstdContexts.shared.with { rm_zstd_exact($0, c.baseAddress, c.count, buffer.baseAddress, whole) } == 0
                case .zlib, .rawDeflate: rm_libdeflate_exact(c.baseAddress, c.count, buffer.baseAddress, whole, stream == .zlib ? 1 : 0) == 0
                }
            }
            n = ok ? whole : 0
        }
        return ok ? out : nil
    }

    /// A whole zlib stream of `atLeast` to `atMost` bytes (its Adler-32 checked at its end):
    /// for a chunk whose exact length the metadata does not say.
    static func complete(_ input: [UInt8], atMost: Int, atLeast: Int, file: String, what: String) throws -> [UInt8] {
        var produced = 0
        var rc: Int32 = 0
        let out = [UInt8](unsafeUninitializedCapacity: atMost + 1) { buffer, n in
            rc = input.withUnsafeBytes { rm_inflate_to_end($0.baseAddress, $0.count, buffer.baseAddress, atMost + 1, &produced) }
            n = rc == Z_STREAM_END ? produced : 0
        }
        guard rc == Z_STREAM_END, produced >= atLeast, produced <= atMost else {
            throw BlockError.invalid(file: file, field: what, detail: rc == Z_STREAM_END ? "inflates to \(produced) bytes, not \(atLeast) to \(atMost)"
                                                                                 : "the compressed stream is damaged")
        }
        return out
    }

    private static func streamed(_ limit: Int, of input: [UInt8], as stream: Stream, whole: Int, file: String, what: String) throws -> [UInt8] {
        var produced = 0
        var ok = false
        let out = [UInt8](unsafeUninitializedCapacity: limit) { buffer, n in
            input.withUnsafeBytes { c in
                switch stream {
                case .zstd:
                    ok = ZstdContexts.shared.with { rm_zstd_decompress_cluster($0, c.baseAddress, c.count, buffer.baseAddress, limit, &produced) } == 0
                case .zlib where limit == whole:
                    var length = uLongf(limit)
                    ok = uncompress(buffer.baseAddress, &length, c.baseAddress?.assumingMemoryBound(to: Bytef.self), uLong(c.count)) == Z_OK
                    produced = Int(length)
                case .zlib where c.count > 2 && c[0] & 0x0F == 8 && c[1] & 0x20 == 0 && (UInt16(c[0]) << 8 | UInt16(c[1])) % 31 == 0:
                    // Part of a zlib stream: its Adler-32 covers the whole cluster and cannot be
                    // checked here, so the deflate data after the 2-byte header is inflated
                    // raw (zlib would otherwise sum every byte it produces for nothing).
                    ok = rm_inflate(c.baseAddress! + 2, c.count - 2, buffer.baseAddress, limit, &produced, -15) == Z_OK
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

/// zstd decompression contexts kept for reuse: making one (~100 KiB, usually an mmap) per
/// cluster costs more than decompressing the cluster. Holds at most `keep` idle contexts, so
/// the pool is bounded by the readers that ever ran at once.
private final class ZstdContexts: Sendable {
    static let shared = ZstdContexts()
    private static let keep = 16
    private let idle = Mutex<[ContextBox]>([])

    /// A context pointer moved between threads; each is used by one caller at a time.
    private struct ContextBox: @unchecked Sendable { let ctx: OpaquePointer }

    /// `body` on a context of its own; -1 if none can be made.
    func with(_ body: (OpaquePointer) -> Int32) -> Int32 {
        guard let box = idle.withLock({ $0.popLast() }) ?? ZSTD_createDCtx().map(ContextBox.init) else { return -1 }
        let result = body(box.ctx)
        let kept = idle.withLock { list -> Bool in
            guard list.count < Self.keep else { return false }
            list.append(box)
            return true
        }
        if !kept { ZSTD_freeDCtx(box.ctx) }
        return result
    }
}
