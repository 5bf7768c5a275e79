import time, cProfile, pstats
def test_cost(make_server):
    make_server()
    for i in range(3):
        t=time.process_time(); w=time.perf_counter()
        srv = make_server()
        a=time.process_time()-t
        srv.stop()
        print("start cpu %.2f start+stop cpu %.2f wall %.2f" % (a, time.process_time()-t, time.perf_counter()-w))
    pr=cProfile.Profile(); pr.enable(); make_server().stop(); pr.disable()
    pstats.Stats(pr).sort_stats("cumulative").print_stats(45)
