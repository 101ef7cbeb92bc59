#if canImport(Glibc)
import Glibc
#endif

/// A page-aligned buffer per libfuse worker thread, so reads need no allocation.
enum ThreadBuffer {
    private final class Box { var base: UnsafeMutableRawPointer; var size: Int
        init(size: Int) { base = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 4096); self.size = size }
        deinit { base.deallocate() }
    }
    nonisolated(unsafe) private static var key: pthread_key_t = {
        var k = pthread_key_t()
        pthread_key_create(&k) { p in if let p { Unmanaged<AnyObject>.fromOpaque(p).release() } }
        return k
    }()

    /// A buffer of at least `size` bytes, valid until the next call on this thread.
    static func get(_ size: Int) -> UnsafeMutableRawBufferPointer {
        if let p = pthread_getspecific(key) {
            let box = Unmanaged<Box>.fromOpaque(p).takeUnretainedValue()
            if box.size >= size { return UnsafeMutableRawBufferPointer(start: box.base, count: size) }
            Unmanaged<Box>.fromOpaque(p).release()
        }
        let box = Box(size: max(size, 1 << 20))
        pthread_setspecific(key, Unmanaged.passRetained(box).toOpaque())
        return UnsafeMutableRawBufferPointer(start: box.base, count: size)
    }
}
