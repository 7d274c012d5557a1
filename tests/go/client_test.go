// A Go backend using the generated stubs in gen/go against a live MDS server.
// The Python test harness starts the server and passes, in MDS_FIXTURES, a model
// and the outputs in-process onnxruntime gives for its inputs.
package client_test

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	mdsv1 "github.com/mds/mds/gen/go/mds/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

type fixtures struct {
	Rows     int64     `json:"rows"`
	Features int64     `json:"features"`
	X        []float32 `json:"x"`
	Scores   []float32 `json:"scores"`
	Label    []int64   `json:"label"`
}

func setup(t *testing.T) (*grpc.ClientConn, fixtures, []byte, context.Context) {
	dir := os.Getenv("MDS_FIXTURES")
	var fx fixtures
	raw, err := os.ReadFile(filepath.Join(dir, "expected.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(raw, &fx); err != nil {
		t.Fatal(err)
	}
	model, err := os.ReadFile(filepath.Join(dir, "model.onnx"))
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient(os.Getenv("MDS_ADDRESS"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(func() { cancel(); conn.Close() })
	return conn, fx, model, ctx
}

func rawFloats(values []float32) []byte {
	out := make([]byte, 4*len(values))
	for i, v := range values {
		binary.LittleEndian.PutUint32(out[4*i:], math.Float32bits(v))
	}
	return out
}

func checkOutputs(t *testing.T, fx fixtures, outputs []*mdsv1.Tensor) {
	t.Helper()
	for _, out := range outputs {
		switch out.Name {
		case "scores":
			got := out.GetContents().GetFp32Contents()
			if raw := out.GetRawData(); len(raw) > 0 {
				got = make([]float32, len(raw)/4)
				for i := range got {
					got[i] = math.Float32frombits(binary.LittleEndian.Uint32(raw[4*i:]))
				}
			}
			if fmt.Sprint(got) != fmt.Sprint(fx.Scores) {
				t.Fatalf("scores %v, onnxruntime gives %v", got, fx.Scores)
			}
		case "label":
			got := out.GetContents().GetInt64Contents()
			if raw := out.GetRawData(); len(raw) > 0 {
				got = make([]int64, len(raw)/8)
				for i := range got {
					got[i] = int64(binary.LittleEndian.Uint64(raw[8*i:]))
				}
			}
			if fmt.Sprint(got) != fmt.Sprint(fx.Label) {
				t.Fatalf("label %v, onnxruntime gives %v", got, fx.Label)
			}
		default:
			t.Fatalf("unexpected output %q", out.Name)
		}
	}
	if len(outputs) != 2 {
		t.Fatalf("%d outputs, want 2", len(outputs))
	}
}

// upload stores model as the next version of name, in chunks over the client stream.
func upload(ctx context.Context, t *testing.T, models mdsv1.ModelServiceClient, name string,
	model []byte) *mdsv1.Model {
	t.Helper()
	upload, err := models.UploadModel(ctx)
	if err != nil {
		t.Fatal(err)
	}
	header := &mdsv1.UploadModelRequest{Payload: &mdsv1.UploadModelRequest_Header{
		Header: &mdsv1.ModelHeader{Name: name, Labels: map[string]string{"client": "go"}}}}
	if err := upload.Send(header); err != nil {
		t.Fatal(err)
	}
	for offset := 0; offset < len(model); offset += 100 {
		end := min(offset+100, len(model))
		if err := upload.Send(&mdsv1.UploadModelRequest{Payload: &mdsv1.UploadModelRequest_Chunk{
			Chunk: model[offset:end]}}); err != nil {
			t.Fatal(err)
		}
	}
	stored, err := upload.CloseAndRecv()
	if err != nil {
		t.Fatal(err)
	}
	return stored
}

func inputTensor(fx fixtures) *mdsv1.Tensor {
	shape := []int64{fx.Rows, fx.Features}
	return &mdsv1.Tensor{Name: "x", Dtype: mdsv1.DataType_DATA_TYPE_FP32, Shape: shape, RawData: rawFloats(fx.X)}
}

func TestGoClient(t *testing.T) {
	conn, fx, model, ctx := setup(t)
	name := os.Getenv("MDS_MODEL_NAME")
	models := mdsv1.NewModelServiceClient(conn)
	inference := mdsv1.NewInferenceServiceClient(conn)

	stored := upload(ctx, t, models, name, model)
	if stored.Version != 1 || stored.Labels["client"] != "go" {
		t.Fatalf("stored %v", stored)
	}

	rawInput := inputTensor(fx)
	typedInput := &mdsv1.Tensor{Name: "x", Dtype: mdsv1.DataType_DATA_TYPE_FP32, Shape: rawInput.Shape,
		Contents: &mdsv1.TensorContents{Fp32Contents: fx.X}}
	for _, input := range []*mdsv1.Tensor{rawInput, typedInput} {
		reply, err := inference.Predict(ctx, &mdsv1.PredictRequest{Model: name, Inputs: []*mdsv1.Tensor{input}})
		if err != nil {
			t.Fatal(err)
		}
		checkOutputs(t, fx, reply.Outputs)
	}

	// PredictStream: every request sent before any reply is read; the fourth is bad.
	stream, err := inference.PredictStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 6; i++ {
		request := &mdsv1.PredictRequest{Model: name, RequestId: fmt.Sprint(i), Inputs: []*mdsv1.Tensor{rawInput}}
		if i == 3 {
			request.Inputs = nil
		}
		if err := stream.Send(request); err != nil {
			t.Fatal(err)
		}
	}
	if err := stream.CloseSend(); err != nil {
		t.Fatal(err)
	}
	for i := 0; ; i++ {
		reply, err := stream.Recv()
		if err == io.EOF {
			if i != 6 {
				t.Fatalf("%d replies, want 6", i)
			}
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if reply.RequestId != fmt.Sprint(i) {
			t.Fatalf("reply %d has request id %q", i, reply.RequestId)
		}
		if i == 3 {
			if reply.GetError().GetCode() != int32(codes.InvalidArgument) {
				t.Fatalf("bad request got %v", reply)
			}
			continue
		}
		checkOutputs(t, fx, reply.GetResponse().Outputs)
	}

	_, err = models.GetModel(ctx, &mdsv1.GetModelRequest{Name: name + "-missing"})
	if status.Code(err) != codes.NotFound {
		t.Fatalf("unknown model gave %v, want NOT_FOUND", err)
	}
}

// TestGoAliases points "prod" at version 1 while version 2 is the latest, predicts through it, lists and deletes it.
func TestGoAliases(t *testing.T) {
	conn, fx, model, ctx := setup(t)
	name := os.Getenv("MDS_MODEL_NAME") + "-aliases"
	models := mdsv1.NewModelServiceClient(conn)
	inference := mdsv1.NewInferenceServiceClient(conn)
	for want := int64(1); want <= 2; want++ {
		if stored := upload(ctx, t, models, name, model); stored.Version != want {
			t.Fatalf("stored version %d, want %d", stored.Version, want)
		}
	}

	alias, err := models.SetAlias(ctx, &mdsv1.SetAliasRequest{Model: name, Alias: "prod", Version: 1})
	if err != nil {
		t.Fatal(err)
	}
	if alias.Model != name || alias.Alias != "prod" || alias.Version != 1 || alias.CanaryVersion != 0 ||
		alias.GetUpdatedAt().GetSeconds() == 0 {
		t.Fatalf("set alias %v", alias)
	}

	predict := func(through string) (*mdsv1.PredictResponse, error) {
		return inference.Predict(ctx, &mdsv1.PredictRequest{
			Model: name, Alias: through, Inputs: []*mdsv1.Tensor{inputTensor(fx)}})
	}
	reply, err := predict("prod")
	if err != nil {
		t.Fatal(err)
	}
	if reply.Version != 1 {
		t.Fatalf("predict through prod ran version %d, want 1", reply.Version)
	}
	checkOutputs(t, fx, reply.Outputs)

	listed, err := models.ListAliases(ctx, &mdsv1.ListAliasesRequest{Model: name})
	if err != nil {
		t.Fatal(err)
	}
	if len(listed.Aliases) != 1 || listed.Aliases[0].Alias != "prod" || listed.Aliases[0].Version != 1 {
		t.Fatalf("listed %v, want prod at version 1", listed.Aliases)
	}

	_, err = predict("staging")
	if status.Code(err) != codes.NotFound || !strings.Contains(status.Convert(err).Message(), "'staging'") {
		t.Fatalf("unknown alias gave %v, want NOT_FOUND naming it", err)
	}

	deleted, err := models.DeleteAlias(ctx, &mdsv1.DeleteAliasRequest{Model: name, Alias: "prod"})
	if err != nil {
		t.Fatal(err)
	}
	if deleted.Alias != "prod" || deleted.Version != 1 {
		t.Fatalf("deleted %v", deleted)
	}
	if _, err := predict("prod"); status.Code(err) != codes.NotFound {
		t.Fatalf("deleted alias gave %v, want NOT_FOUND", err)
	}
}
