// crdcheck validates the Prometheus Operator objects of rendered manifests
// (ServiceMonitor, PrometheusRule) against the operator's own Go types, the
// source its CRD schemas are generated from: each object is decoded strictly
// (an unknown or misspelt field, a duplicate key or a value of the wrong
// type fails), then the fields the CRD requires are checked. Objects of
// other kinds are skipped (deploy/k8s/tools/validate.py covers them).
//
//	crdcheck FILE...   exit 1 naming every bad object
package main

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"regexp"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	yamlutil "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

type typeMeta struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name string `json:"name"`
	} `json:"metadata"`
}

// The CRD's pattern for monitoringv1.Duration fields.
var duration = regexp.MustCompile(`^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$`)

func checkServiceMonitor(doc []byte) []string {
	var sm monitoringv1.ServiceMonitor
	if err := yaml.UnmarshalStrict(doc, &sm); err != nil {
		return []string{err.Error()}
	}
	var p []string
	if len(sm.Spec.Endpoints) == 0 {
		p = append(p, "spec.endpoints: none")
	}
	if len(sm.Spec.Selector.MatchLabels) == 0 && len(sm.Spec.Selector.MatchExpressions) == 0 {
		p = append(p, "spec.selector: selects every Service")
	}
	for i, e := range sm.Spec.Endpoints {
		if e.Port == "" && e.TargetPort == nil {
			p = append(p, fmt.Sprintf("spec.endpoints[%d].port: missing", i))
		}
		for _, d := range []monitoringv1.Duration{e.Interval, e.ScrapeTimeout} {
			if d != "" && !duration.MatchString(string(d)) {
				p = append(p, fmt.Sprintf("spec.endpoints[%d]: bad duration %q", i, d))
			}
		}
	}
	return p
}

func checkPrometheusRule(doc []byte) []string {
	var pr monitoringv1.PrometheusRule
	if err := yaml.UnmarshalStrict(doc, &pr); err != nil {
		return []string{err.Error()}
	}
	var p []string
	if len(pr.Spec.Groups) == 0 {
		p = append(p, "spec.groups: none")
	}
	for gi, g := range pr.Spec.Groups {
		if g.Name == "" {
			p = append(p, fmt.Sprintf("spec.groups[%d].name: missing", gi))
		}
		for ri, r := range g.Rules {
			where := fmt.Sprintf("spec.groups[%d].rules[%d]", gi, ri)
			if (r.Alert == "") == (r.Record == "") {
				p = append(p, where+": exactly one of alert and record is required")
			}
			if r.Expr.String() == "" {
				p = append(p, where+".expr: missing")
			}
			if r.For != nil && !duration.MatchString(string(*r.For)) {
				p = append(p, fmt.Sprintf("%s.for: bad duration %q", where, *r.For))
			}
		}
	}
	return p
}

func main() {
	bad := 0
	checked := 0
	for _, path := range os.Args[1:] {
		data, err := os.ReadFile(path)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		reader := yamlutil.NewYAMLReader(bufioReader(data))
		for {
			doc, err := reader.Read()
			if err == io.EOF {
				break
			}
			if err != nil {
				fmt.Fprintf(os.Stderr, "%s: %v\n", path, err)
				os.Exit(2)
			}
			if len(bytes.TrimSpace(doc)) == 0 {
				continue
			}
			var tm typeMeta
			if err := yaml.Unmarshal(doc, &tm); err != nil {
				fmt.Fprintf(os.Stderr, "%s: %v\n", path, err)
				os.Exit(2)
			}
			var problems []string
			switch {
			case tm.APIVersion == "monitoring.coreos.com/v1" && tm.Kind == "ServiceMonitor":
				problems = checkServiceMonitor(doc)
			case tm.APIVersion == "monitoring.coreos.com/v1" && tm.Kind == "PrometheusRule":
				problems = checkPrometheusRule(doc)
			default:
				continue
			}
			checked++
			if len(problems) > 0 {
				bad++
				for _, pr := range problems {
					fmt.Printf("FAIL %s %s/%s: %s\n", path, tm.Kind, tm.Metadata.Name, pr)
				}
			} else {
				fmt.Printf("ok   %s %s/%s (prometheus-operator %s types)\n", path, tm.Kind, tm.Metadata.Name, operatorVersion)
			}
		}
	}
	if checked == 0 {
		fmt.Println("FAIL no ServiceMonitor or PrometheusRule found")
		os.Exit(1)
	}
	if bad > 0 {
		os.Exit(1)
	}
}
